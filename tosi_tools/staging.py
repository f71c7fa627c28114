"""Moving a layer applied beside a flat root into it: the parallel half of a flat extraction.

A flat root takes its layers bottom first, each on top of the ones below, but a
layer further up need not wait to be extracted, only to be put in place: unpack
applies it alone (layer.STAGED) into an empty directory on the root's filesystem
while the layers below go into the root, and once they are in, `merge` moves it in
with rename(2). What the move makes is what applying the layer in the root makes;
where it could not be, it raises Unmergeable before it changes anything, and the
caller applies the layer in the root instead.

The move, in order:
 1. the layer's deletions of lower entries (LayerStats.deletions), as flat mode
    does them: a whiteout's path removed; an opaque directory emptied, or removed
    if the root has a non-directory there (the staged tree holds the directory);
 2. the staged tree's entries renamed into place: a directory whole where the
    root has nothing of that name, merged where the root has a directory; a
    non-directory replacing a non-directory;
 3. the attributes of each merged directory the layer names (owner, xattrs, mode,
    mtime), deepest first, as flat mode gives a directory an entry names over one
    that exists.

A dry run of the same steps comes first and raises Unmergeable for what a rename
cannot do as flat mode does: a path through a symlink (flat mode resolves it in
the root; its result then hangs on the order of the tar), a directory where the
root has a non-directory or the other way round (the same), a setgid directory of
the root where the layer makes directories it does not name (flat mode would give
them its group), a merge nesting deeper than MAX_DEPTH (a pair of handles is held
per level).

Both trees are private while this runs (the root stays 0700 until the image is in
it; the staged tree is in the workdir), so what the dry run saw is what the move
finds. Every directory is opened through its parent's handle, never through a
symlink; nothing is resolved from a path.
"""

import os
import stat

from . import saferoot

DELETE, EMPTY = "delete", "empty"
# Xattrs the filesystem or an LSM owns, not the layer (layer.py keeps them too): never
# copied or dropped by a move; a directory entry that names one is not staged.
LOCAL_XATTR_PREFIXES = ("security.selinux",)
KEPT_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.") + LOCAL_XATTR_PREFIXES
MAX_DEPTH = 64


class Unmergeable(Exception):
    """The staged layer cannot be moved in to make what applying it would: apply it instead."""


def merge(stage_fd: int, root_fd: int, deletions: list, implicit: list, root_named: bool,
          entry_dirs: frozenset = frozenset()) -> None:
    """Move the staged tree of one layer (`stage_fd`) into the flat root (`root_fd`).

    `deletions`, `implicit`: LayerStats.deletions and implicit_dirs, the directories
    the layer made without naming them, which keep the root's attributes where the
    root has them. `root_named`: the layer has a "./" entry,
    whose owner and xattrs the root takes (its mode and mtime are the caller's:
    layer.apply_layer's hold_root). `entry_dirs`: LayerStats.entry_dirs, the
    directories the layer placed entries in. Raises Unmergeable, with nothing changed, when
    the move would not make what applying the layer makes (see the module's doc);
    OSError as it comes once something moved.
    """
    deleted = {parts for kind, parts in deletions if kind == DELETE}
    emptied = {parts for kind, parts in deletions if kind == EMPTY}
    for kind, parts in deletions:
        _delete(stage_fd, root_fd, kind, parts, act=False)
    implied = set(implicit)
    _walk(stage_fd, root_fd, deleted, emptied, implied, act=False, entry_dirs=entry_dirs)
    for kind, parts in deletions:
        _delete(stage_fd, root_fd, kind, parts, act=True)
    _walk(stage_fd, root_fd, deleted, emptied, implied, act=True)
    if root_named:
        _copy_owner_and_xattrs(stage_fd, root_fd, drop=False)


def _delete(stage_fd, root_fd, kind, parts, act):
    """Step 1 for one deletion; the dry run checks its path in both trees."""
    if not parts:
        if kind == EMPTY:  # an opaque root: everything lower goes
            if act:
                for name in os.listdir(root_fd):
                    saferoot.remove_tree_at(root_fd, name)
            return
        raise Unmergeable("a deletion of the root")
    if not act:
        # Flat mode resolved the path when it met the whiteout, through what the layer
        # had made by then: a symlink of the layer's on it may have led elsewhere. (A
        # non-directory of the layer's on it replaced what the root has there, the
        # whole directory if it is one, which the walk refuses: nothing else to check.)
        _check_dirs(stage_fd, parts[:-1], "the layer")
    parent = _open_dirs(root_fd, parts[:-1], act)
    if parent is None:
        return  # nothing lower there
    try:
        st = saferoot.lstat_at(parent, parts[-1])
        if not act or st is None:
            return
        if kind == DELETE or not stat.S_ISDIR(st.st_mode):
            saferoot.remove_tree_at(parent, parts[-1])
            return
        fd = os.open(parts[-1], saferoot.DIR_FLAGS, dir_fd=parent)
        try:
            for name in os.listdir(fd):
                saferoot.remove_tree_at(fd, name)
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def _check_dirs(top_fd, parts, where):
    """Raise Unmergeable if a component of `parts` below `top_fd` is a symlink."""
    fd = _open_dirs(top_fd, parts, act=False, where=where)
    if fd is not None:
        os.close(fd)


def _open_dirs(top_fd, parts, act, where="the root"):
    """A new fd of the directory `parts` below `top_fd`; None if a component is missing or
    not a directory (flat mode finds nothing to delete there either). The dry run raises
    Unmergeable for a symlink on the way (flat mode resolves it)."""
    fd, stop = saferoot.open_dirs_at(top_fd, parts)
    if fd is None and not act:
        parent, _ = saferoot.open_dirs_at(top_fd, parts[:stop])
        assert parent is not None  # parts[:stop] were all opened just now, and nothing changes them
        try:
            st = saferoot.lstat_at(parent, parts[stop])
        finally:
            os.close(parent)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise Unmergeable(f"{'/'.join(parts[:stop + 1])!r} is a symlink in {where}")
    return fd


class _EntryDirs:
    """Whether an entry of the layer was placed at or below a directory: the prefixes of
    LayerStats.entry_dirs, gathered once, at the first question (a symlink of the root
    the layer replaces; most layers ask none)."""

    def __init__(self, entry_dirs):
        self.entry_dirs, self.prefixes = entry_dirs, None

    def below(self, path):
        if self.prefixes is None:
            self.prefixes = {parts[:i] for parts in self.entry_dirs for i in range(1, len(parts) + 1)}
        return path in self.prefixes


def _walk(stage_fd, root_fd, deleted, emptied, implicit, act, entry_dirs=frozenset()):
    """Steps 2 and 3 (`act`), or their dry run: the staged tree, top-down, beside the root's."""
    went_through = _EntryDirs(entry_dirs).below
    # [stage fd, root fd, canonical path, names left, the staged directory's mtime (ns) before
    # its entries moved out]
    stack = [[os.dup(stage_fd), os.dup(root_fd), (), sorted(os.listdir(stage_fd), reverse=True), None]]
    try:
        while stack:
            here = stack[-1]
            if not here[3]:
                stack.pop()
                try:
                    if act and here[2] and here[2] not in implicit:
                        _copy_owner_and_xattrs(here[0], here[1], drop=True)
                        _copy_mode_and_mtime(here[0], here[1], here[4])
                finally:
                    os.close(here[0])
                    os.close(here[1])
                continue
            name = here[3].pop()
            path = here[2] + (name,)
            staged = os.lstat(name, dir_fd=here[0])
            there = saferoot.lstat_at(here[1], name)
            if (not act and there is not None and stat.S_ISLNK(there.st_mode)
                    and (path in deleted or here[2] in emptied or path in emptied
                         or not stat.S_ISDIR(staged.st_mode)) and went_through(path)):
                # Flat mode put entries where the root's symlink leads, then the layer
                # replaced or deleted the name; the staged tree has them below the name.
                raise Unmergeable(f"{'/'.join(path)!r} is a symlink in the root that entries of the "
                                  "layer went through before the layer replaced it")
            if not act and there is not None:
                # The dry run sees the root as step 1 will have left it.
                if path in deleted or here[2] in emptied or (path in emptied and not stat.S_ISDIR(there.st_mode)):
                    there = None
            if there is None:
                if act:
                    os.rename(name, name, src_dir_fd=here[0], dst_dir_fd=here[1])
                continue
            if stat.S_ISDIR(staged.st_mode) != stat.S_ISDIR(there.st_mode):
                what = "a directory" if stat.S_ISDIR(staged.st_mode) else "a non-directory"
                raise Unmergeable(f"{'/'.join(path)!r}: the layer has {what} where the root has "
                                  f"{'a non-directory' if stat.S_ISDIR(staged.st_mode) else 'a directory'}")
            if not stat.S_ISDIR(staged.st_mode):
                if act:
                    os.rename(name, name, src_dir_fd=here[0], dst_dir_fd=here[1])
                continue
            if implicit and there.st_mode & stat.S_ISGID:
                # Flat mode makes a directory no entry names with the group and setgid
                # bit of a setgid parent; the staged ones have neither.
                raise Unmergeable(f"{'/'.join(path)!r} is setgid in the root and the layer makes "
                                  "directories it does not name")
            if len(stack) >= MAX_DEPTH:
                raise Unmergeable(f"{'/'.join(path)!r}: directories of the layer and the root nest "
                                  f"deeper than {MAX_DEPTH}")
            sub = os.open(name, saferoot.DIR_FLAGS, dir_fd=here[0])
            try:
                sub_root = os.open(name, saferoot.DIR_FLAGS, dir_fd=here[1])
            except BaseException:
                os.close(sub)
                raise
            stack.append([sub, sub_root, path, sorted(os.listdir(sub), reverse=True), staged.st_mtime_ns])
    finally:
        for entry in stack:
            os.close(entry[0])
            os.close(entry[1])


def _xattrs(fd):
    try:
        return {key: os.getxattr(fd, key) for key in os.listxattr(fd)
                if not key.startswith(KEPT_XATTR_PREFIXES)}
    except OSError:
        return {}  # a filesystem without xattrs


def _copy_owner_and_xattrs(src_fd, dst_fd, drop):
    """The owner and the xattrs of the staged directory `src_fd` onto `dst_fd`; with
    `drop`, the other xattrs `dst_fd` had go (as flat mode drops them)."""
    st = os.fstat(src_fd)
    os.fchown(dst_fd, st.st_uid, st.st_gid)
    wanted = _xattrs(src_fd)
    if drop:
        for key in _xattrs(dst_fd):
            if key not in wanted:
                os.removexattr(dst_fd, key)
    for key, value in wanted.items():
        os.setxattr(dst_fd, key, value)


def _copy_mode_and_mtime(src_fd, dst_fd, mtime_ns):
    os.fchmod(dst_fd, stat.S_IMODE(os.fstat(src_fd).st_mode))
    os.utime(dst_fd, ns=(mtime_ns, mtime_ns))
