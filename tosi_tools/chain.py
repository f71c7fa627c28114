"""Chain-specific overlay dirs: a layer's entries below a lower layer's symlink, where a
flat extraction puts them.

A layer that holds `lib/x.so` without naming `lib`, over a lower layer where `lib ->
usr/lib` (merged /usr), puts the file in usr/lib when applied flat: names are resolved
through the tree below, symlinks followed inside the root (as containerd and umoci
do). Extracted alone, as an overlayfs lowerdir, the layer has an implicit directory
`lib` instead, which overlayfs shows over the symlink. Its overlay dir
(`overlays/<hex>/`) is shared by every image that has the layer, whatever lies below
it, so it stays as it is; for a stack where such a directory sits over a symlink the
mount uses `overlays/.tosi-chain-<hex>/` instead: a copy of the layer dir (its
directories made anew, everything else hardlinked: the same inodes, nothing copied)
with each such directory's entries moved to where the symlink leads. Its name hashes
the chainID (the OCI one, over the diffIDs the layer dirs record in `<hex>.diffid`),
which names the layer and everything below it, all the copy depends on, with the
rules it was made by (CHAIN_RULES). Its `.implicit` and
`.whiteouts` records sit beside it, as a layer dir's do.

Symlinks are resolved as tosi's flat extraction does (saferoot): component by
component in the view the lowerdirs make, absolute targets from the view's root,
".." stopped at the root, at most saferoot.MAX_SYMLINKS of them; nothing is opened
through a symlink, only read with readlink, so a hostile layer's link to /etc leads
to the image's own etc. Where the flat extraction fails (a symlink to a file, a loop),
the layer dir is used as it is and the mount warns (see mount._shadowed); but an
implicit directory that holds nothing but whiteouts (and such directories) over a
lower non-directory, a symlink that leads to none included, is left out of the copy:
the flat extraction makes no directory there and deletes nothing below it.

Left as the layer dir has them (tar order is not recorded): entries the layer put
below a lower symlink before it named, replaced or whited out that symlink's name
(flat: the entries go through the symlink, then the name changes; the layer dir has
them below its own entry of that name, or not at all), and an entry met twice once
moved (the one already there stays; a whiteout device gives way to an entry). The
strict xfails of tests/test_layout_equivalence.py name them.
"""

import errno
import logging
import os
import secrets
import stat
from collections import OrderedDict

from . import overlayfs, saferoot
from .cache import TRUSTED_FORM, Workdir, fsync_dir, require_cached, sync_filesystem
from .digest import digest_of
from .errors import CacheError

log = logging.getLogger("tosi.chain")

CHAIN_PREFIX = Workdir.CHAIN_PREFIX
# The rules a copy is made by: a copy made by other rules (an older tosi's) has another
# name, so it is never reused (tosi-gc removes it as unused). v2: a symlink that leads
# above itself, and directories of whiteouts alone over a lower non-directory.
CHAIN_RULES = "v2"
_KEEP_OPEN = 64  # directory handles a copy holds while descending, as saferoot.walk_tree
_LOWER_HANDLES = 256  # directories of the lower layers kept open while resolving


class _Unresolvable(Exception):
    """A name the flat extraction could not resolve either (a loop, a non-directory)."""


def dirs_record(layer_dir, suffix):
    """The directories unpack recorded in `layer_dir` + `suffix` (Workdir.IMPLICIT_SUFFIX,
    WHITEOUTS_SUFFIX), as "/"-joined names, "" for the root; no record: none."""
    try:
        with open(layer_dir + suffix, "rb") as f:
            names = f.read().split(b"\0")
    except FileNotFoundError:
        return frozenset()
    found = set()
    for name in names:
        if name == b".":
            found.add("")
        elif name and _canonical(name):
            found.add(os.fsdecode(name))  # unpack wrote them canonical; others are no directory
    return frozenset(found)


def _canonical(name):
    """Whether a relative name has no empty, "." or ".." component (without splitting it)."""
    return not (name in (b".", b"..") or name.startswith((b"/", b"./", b"../"))
                or name.endswith((b"/", b"/.", b"/..")) or b"//" in name or b"/./" in name
                or b"/../" in name)


def _parts(name):
    return tuple(name.split("/")) if name else ()


def _write_record(path, dirs):
    if not dirs:
        return
    tmp = f"{path}.{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(b"\0".join(os.fsencode("/".join(parts) or ".") for parts in sorted(dirs)))
    os.replace(tmp, path)


# ---------------------------------------------------------------- which layers need one


def chain_lowers(ovdir, lowers, form=TRUSTED_FORM):
    """`lowers` (names in `ovdir`, topmost first) with each layer whose implicit directories
    sit over a lower symlink (or, whiteouts alone, over another lower non-directory)
    replaced by its chain-specific overlay dir, made if missing.
    `form` is the layer dirs' (cache.TRUSTED_FORM or USER_FORM): a copy marks the
    directories it makes opaque in that form, and has a name of that form's."""
    dirs = [os.path.realpath(os.path.join(ovdir, lower)) for lower in lowers]
    implicit = [{_parts(name) for name in dirs_record(d, Workdir.IMPLICIT_SUFFIX) if name}
                for d in dirs]
    if not any(implicit[:-1]) or not _maybe_over_non_dirs(dirs, implicit):
        return lowers
    result, effective = list(lowers), list(dirs)
    chain_ids = _chain_ids(dirs, form)
    for index in range(len(dirs) - 2, -1, -1):  # bottom up: each sees the final stack below it
        if not implicit[index] or not _non_dirs_below(implicit[index], effective[index + 1:]):
            continue
        name = CHAIN_PREFIX + chain_ids[index]
        final = os.path.join(ovdir, name)
        try:
            made = os.lstat(final)
        except FileNotFoundError:
            made = None
        if made is not None:
            require_cached(final, made, "chain overlay dir")
            if not stat.S_ISDIR(made.st_mode):
                raise CacheError(f"chain overlay dir {final} is not a directory; remove it")
        else:
            if not _make_chain_dir(ovdir, name, dirs[index], effective[index + 1:], form):
                continue
        result[index], effective[index] = name, final
    return result


def chain_ids(dirs, form=TRUSTED_FORM):
    """The hex of each layer's chainID (topmost first) for the layer dirs `dirs`: the
    name a chain copy of each would have after CHAIN_PREFIX (tosi-gc tells them so)."""
    return _chain_ids(dirs, form)


def attributes_key(dirs):
    """The key of the attributes lowerdir of the lowerdirs `dirs` (real paths, topmost
    first): the version ("v2": one made before whiteout directories were merged lacks
    them) and the exact list."""
    import hashlib  # off the warm path of images that need no such lowerdir

    return hashlib.sha256("\0".join(["v2", *dirs]).encode()).hexdigest()[:32]


def _chain_ids(dirs, form=TRUSTED_FORM):
    """For each layer (topmost first), the sha256 hex of CHAIN_RULES, the form and its
    chainID, from the diffIDs its dir records (a dir without a record counts by its own
    name): the forms never share a copy, nor do the rules."""
    ids, chain = [], None
    for layer_dir in reversed(dirs):
        path = Workdir.diffid_of(layer_dir)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            diff_id = "dir:" + os.path.basename(layer_dir)
        else:
            with open(fd) as f:
                require_cached(path, os.fstat(fd), "diffID record")
                diff_id = f.read().strip()
        chain = diff_id if chain is None else digest_of(f"{chain} {diff_id}".encode())
        algorithm, _, hexpart = chain.partition(":")
        ids.append(hexpart if algorithm in ("sha256", "sha512") else digest_of(chain.encode())[7:])
    if form != TRUSTED_FORM:
        ids = [digest_of(f"{form} {hexpart}".encode())[7:] for hexpart in ids]
    return [digest_of(f"{CHAIN_RULES} {hexpart}".encode())[7:] for hexpart in reversed(ids)]


def _non_dir_paths(layer_dir, tree):
    """The paths of `tree` (a saferoot.tree_of of tuples) that are symlinks or other
    non-directories (whiteout devices aside) in `layer_dir`, reached through real
    directories only."""
    found = set()

    def enter(parent_fd, node):
        fd = saferoot.open_dir_at(parent_fd, node.name)
        if fd is None:
            st = saferoot.lstat_at(parent_fd, node.name)
            if st is not None and not overlayfs.is_whiteout(st):
                found.add(node.data)
        return fd

    fd = os.open(layer_dir, saferoot.DIR_FLAGS)
    try:
        saferoot.walk_tree(fd, tree, enter)
    finally:
        os.close(fd)
    return found


def _tree(paths):
    tree, nodes = saferoot.tree_of(paths, (), lambda parts: (parts[:-1], parts[-1]))
    for parts, node in nodes.items():
        node.data = parts
    return tree


def _maybe_over_non_dirs(dirs, implicit):
    """Whether a layer's implicit directory is a symlink or another non-directory in a
    layer below it: one walk per layer over the implicit directories of the layers above
    (the cheap test of every mount)."""
    above = set()
    for index, layer_dir in enumerate(dirs):
        if above and _non_dir_paths(layer_dir, _tree(above)):
            return True
        above |= implicit[index]
    return False


def _non_dirs_below(paths, below):
    tree = _tree(paths)
    return any(_non_dir_paths(layer_dir, tree) for layer_dir in below)


# ---------------------------------------------------------------- the view of a stack


class _Stack:
    """Read-only lookups in lowerdirs (topmost first) as overlayfs shows them, with the
    layer on top (index 0) being relocated: its implicit directories (`implicit`, kept
    up to date by the caller) give way to a lower symlink of their name."""

    def __init__(self, dirs, implicit):
        self.fds = [os.open(d, saferoot.DIR_FLAGS) for d in dirs]
        self.implicit = implicit
        self._open = OrderedDict()  # (index, parts) -> fd of a lower layer's directory, or None

    def close(self):
        for fd in self._open.values():
            if fd is not None:
                os.close(fd)
        for fd in self.fds:
            os.close(fd)

    def _dir(self, index, parts):
        """An fd of the layer's real directory at `parts`, or None; the top's is the caller's to close."""
        if index == 0:
            return open_path(self.fds[0], parts)
        key = (index, parts)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        fd = self.fds[index] if not parts else None
        if parts:
            parent = self._dir(index, parts[:-1])
            fd = saferoot.open_dir_at(parent, parts[-1]) if parent is not None else None
        if parts:
            self._open[key] = fd
            if len(self._open) > _LOWER_HANDLES:
                _, old = self._open.popitem(last=False)
                if old is not None:
                    os.close(old)
        return fd

    def _entry(self, index, parts):
        """(lstat, opaque) of the entry at `parts` in layer `index`, or None."""
        fd = self._dir(index, parts[:-1])
        if fd is None:
            return None
        try:
            st = saferoot.lstat_at(fd, parts[-1])
            opaque = False
            if st is not None and stat.S_ISDIR(st.st_mode):
                opaque = overlayfs.is_opaque(fd, parts[-1])
            if st is not None and stat.S_ISLNK(st.st_mode):
                return st, os.readlink(parts[-1], dir_fd=fd)
            return None if st is None else (st, opaque)
        finally:
            if index == 0:
                os.close(fd)

    def child(self, chain, parts):
        """What the view shows at `parts` given `chain`, the layers making up its parent:
        ("dir", chain), ("link", target), ("missing", None) or ("other", None)."""
        below = []
        for position, index in enumerate(chain):
            found = self._entry(index, parts)
            if found is None:
                continue
            st, extra = found
            if stat.S_ISDIR(st.st_mode):
                if index == 0 and parts in self.implicit and not extra:
                    rest = self.child(chain[position + 1:], parts)
                    if rest[0] == "link":
                        return rest
                    return "dir", [0] + (rest[1] if rest[0] == "dir" else [])
                below.append(index)
                if extra:
                    break
                continue
            if below:
                break  # a non-directory under a directory: hidden
            if stat.S_ISLNK(st.st_mode):
                return "link", extra
            return ("missing", None) if overlayfs.is_whiteout(st) else ("other", None)
        return ("dir", below) if below else ("missing", None)

    def kind_for_top(self, chain, parts):
        """child()'s kind at `parts` for the layer on top, whose implicit directory there
        gives way to a lower symlink ("link"), or stands over another lower non-directory
        ("other")."""
        kind = self.child(chain, parts)[0]
        if kind == "dir" and parts in self.implicit and self.child([i for i in chain if i], parts)[0] == "other":
            return "other"
        return kind

    def chain_of(self, parts):
        """The layers making up the directory at canonical `parts` (every component one)."""
        chain = list(range(len(self.fds)))
        for i in range(len(parts)):
            kind, chain = self.child(chain, parts[:i + 1])
            if kind != "dir":
                raise _Unresolvable(f"/{'/'.join(parts[:i + 1])} is no directory")
        return chain

    def resolve(self, parts):
        """The canonical path of `parts` resolved as the flat extraction resolves an
        entry's parent (every component followed; what is missing it makes as it goes).
        _Unresolvable where it fails."""
        cur, chain, missing_from = [], list(range(len(self.fds))), None
        pending, links = list(reversed(parts)), 0
        while pending:
            name = pending.pop()
            if name == "..":
                if cur:
                    cur.pop()
                if missing_from is not None and len(cur) <= missing_from:
                    missing_from = None
                if missing_from is None:
                    chain = self.chain_of(tuple(cur))
                continue
            if missing_from is not None:
                cur.append(name)
                continue
            kind, found = self.child(chain, tuple(cur) + (name,))
            if kind == "dir":
                cur.append(name)
                chain = found
            elif kind == "link":
                links += 1
                if links > saferoot.MAX_SYMLINKS:
                    raise _Unresolvable(f"/{'/'.join(parts)}: too many levels of symbolic links")
                if found.startswith("/"):
                    cur, chain = [], list(range(len(self.fds)))
                pending.extend(reversed([p for p in found.split("/") if p not in ("", ".")]))
            elif kind == "missing":
                missing_from = len(cur)
                cur.append(name)
            else:
                raise _Unresolvable(f"/{'/'.join(cur + [name])} is not a directory")
        return tuple(cur)


def open_path(root_fd, parts):
    """A new fd of the real directory at `parts` below `root_fd` (no symlink followed), or None."""
    fd = os.dup(root_fd)
    for name in parts:
        child = saferoot.open_dir_at(fd, name)
        os.close(fd)
        if child is None:
            return None
        fd = child
    return fd


# ---------------------------------------------------------------- making one


def _needs_moving(layer_dir, implicit, below):
    """Whether one of the layer's implicit directories gives way to a lower symlink, or is
    one of whiteouts alone over a lower non-directory (see _whiteouts_only)."""
    stack = _Stack([layer_dir, *below], implicit)
    top = os.open(layer_dir, saferoot.DIR_FLAGS)
    try:
        for parts in sorted(implicit, key=lambda p: (len(p), p)):
            try:
                chain = stack.chain_of(parts[:-1])
            except _Unresolvable:
                continue
            kind = stack.kind_for_top(chain, parts)
            if kind == "link" or (kind == "other" and _whiteouts_only(top, parts, implicit)):
                return True
        return False
    finally:
        os.close(top)
        stack.close()


def _whiteouts_only(root_fd, parts, implicit):
    """Whether the directory at `parts` of the layer (or copy) at `root_fd` holds whiteout
    devices and implicit directories of the same alone, none of them opaque: where the
    view below has a non-directory, the flat extraction deletes nothing there and makes
    no directory (FlatLayout.made_parent), so the copy must not have it either."""
    pending = [parts]
    while pending:
        here = pending.pop()
        fd = open_path(root_fd, here)
        if fd is None or here not in implicit:
            if fd is not None:
                os.close(fd)
            return False
        try:
            if overlayfs.is_opaque(fd):
                return False
            for name in os.listdir(fd):
                st = os.lstat(name, dir_fd=fd)
                if stat.S_ISDIR(st.st_mode):
                    pending.append(here + (name,))
                elif not overlayfs.is_whiteout(st):
                    return False
        finally:
            os.close(fd)
    return True


def _drop(root_fd, parts, implicit, whiteouts):
    """Remove the directory at `parts` of the copy, and its paths from the records."""
    parent = open_path(root_fd, parts[:-1])
    try:
        saferoot.remove_tree_at(parent, parts[-1])
    finally:
        os.close(parent)
    gone = {p for p in implicit | whiteouts if p[:len(parts)] == parts}
    implicit -= gone
    whiteouts -= gone


def _make_chain_dir(ovdir, name, layer_dir, below, form=TRUSTED_FORM):
    """Make ovdir/`name` for the layer at `layer_dir` over the lowerdirs `below`; False
    when nothing of it is to move or to leave out after all (_needs_moving)."""
    implicit = {_parts(n) for n in dirs_record(layer_dir, Workdir.IMPLICIT_SUFFIX)}
    whiteouts = {_parts(n) for n in dirs_record(layer_dir, Workdir.WHITEOUTS_SUFFIX)}
    if not _needs_moving(layer_dir, implicit - {()}, below):
        return False
    final = os.path.join(ovdir, name)
    tmp = f"{final}.{secrets.token_hex(4)}"  # not ".tmp-<hex>-": unpack's temporaries
    os.mkdir(tmp, 0o700)
    try:
        src = os.open(layer_dir, saferoot.DIR_FLAGS)
        try:
            dst = os.open(tmp, saferoot.DIR_FLAGS)
            try:
                link_tree(src, dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        _relocate(tmp, implicit, whiteouts, below, overlayfs.opaque_xattr(form))
        _write_record(final + Workdir.IMPLICIT_SUFFIX, implicit)
        _write_record(final + Workdir.WHITEOUTS_SUFFIX, whiteouts)
        sync_filesystem(tmp)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(final):
                raise
            saferoot.remove_tree(tmp)  # another mount made it meanwhile
        else:
            fsync_dir(ovdir)
    except BaseException:
        saferoot.remove_tree(tmp)
        raise
    log.info("%s: entries below lower symlinks moved where they lead, in %s",
             os.path.basename(layer_dir), name)
    return True


def _relocate(top, implicit, whiteouts, below, opaque_key=overlayfs.OPAQUE_XATTR):
    """Move the entries of each implicit directory of the copy at `top` that gives way to
    a lower symlink to where the symlink leads; `implicit` and `whiteouts` (canonical
    tuples) follow the moves."""
    stack = _Stack([top, *below], implicit)
    moves = []
    try:
        for original in sorted(implicit - {()}, key=lambda p: (len(p), p)):
            parts = _moved(original, moves)
            if parts is None or parts not in implicit:
                continue  # dropped in a merge, or merged into a named directory
            try:
                chain = stack.chain_of(parts[:-1])
                kind = stack.kind_for_top(chain, parts)
            except _Unresolvable as exc:
                log.warning("/%s: %s: left where the layer has it", "/".join(original), exc)
                continue
            if kind not in ("link", "other"):
                continue
            try:
                if kind == "other":
                    raise _Unresolvable(f"/{'/'.join(parts)} is not a directory")
                dest = stack.resolve(parts)
            except _Unresolvable as exc:
                if _whiteouts_only(stack.fds[0], parts, implicit):
                    _drop(stack.fds[0], parts, implicit, whiteouts)  # they delete nothing there
                elif kind == "link":
                    log.warning("/%s: %s: left where the layer has it", "/".join(original), exc)
                continue
            if dest[:len(parts)] == parts:
                log.warning("/%s: the symlink leads into itself: left where the layer has it",
                            "/".join(original))
                continue
            root_fd = os.open(top, saferoot.DIR_FLAGS)
            try:
                if _make_parents(root_fd, dest, implicit, opaque_key):
                    source = parts
                    if parts[:len(dest)] == dest:
                        # The symlink leads above itself ("." or ".."): an entry of its
                        # own name lands where the directory that holds it is.
                        source = _aside(root_fd, parts, implicit, whiteouts)
                    _merge(root_fd, source, dest, implicit, whiteouts, opaque_key)
                else:
                    log.warning("/%s: the layer has a non-directory on the way to /%s: left "
                                "where the layer has it", "/".join(original), "/".join(dest))
            finally:
                os.close(root_fd)
            moves.append((parts, dest))
    finally:
        stack.close()


def _moved(parts, moves):
    """Where a path of the layer is after `moves` [(from, to)], in order."""
    for source, dest in moves:
        if parts[:len(source)] == source:
            parts = dest + parts[len(source):]
    return parts


def _make_parents(root_fd, dest, implicit, opaque_key=overlayfs.OPAQUE_XATTR):
    """The directories above `dest` that the copy lacks, made as the flat extraction makes
    them (0755, ours): implicit, or opaque in place of a whiteout device of the layer's.
    False (nothing made) when the copy has a non-directory on the way."""
    fd = os.dup(root_fd)
    try:
        for i, name in enumerate(dest[:-1]):
            child = saferoot.open_dir_at(fd, name)
            if child is None:
                st = saferoot.lstat_at(fd, name)
                if st is not None and not overlayfs.is_whiteout(st):
                    return False  # the first one missing: nothing is made yet
                if st is not None:
                    os.unlink(name, dir_fd=fd)  # a whiteout device: the directory is new
                os.mkdir(name, 0o755, dir_fd=fd)
                child = os.open(name, saferoot.DIR_FLAGS, dir_fd=fd)
                os.fchmod(child, 0o755)
                if st is not None:
                    os.setxattr(child, opaque_key, b"y")
                else:
                    implicit.add(dest[:i + 1])
            os.close(fd)
            fd = child
        return True
    finally:
        os.close(fd)


def _aside(root_fd, parts, implicit, whiteouts):
    """Rename the directory at `parts` of the copy to a new name beside it; that path."""
    parent = open_path(root_fd, parts[:-1])
    try:
        aside = parts[:-1] + (f".tosi-aside-{secrets.token_hex(8)}",)
        os.rename(parts[-1], aside[-1], src_dir_fd=parent, dst_dir_fd=parent)
    finally:
        os.close(parent)
    _rebase(implicit, parts, aside)
    _rebase(whiteouts, parts, aside)
    return aside


def _rebase(paths, source, dest):
    moved = {p for p in paths if p[:len(source)] == source}
    paths -= moved
    paths |= {dest + p[len(source):] for p in moved}


def _merge(root_fd, source, dest, implicit, whiteouts, opaque_key=overlayfs.OPAQUE_XATTR):
    """Move the entry at `source` to `dest` in the copy; where `dest` holds a directory
    too, their entries merge (a named directory's attributes win over an implicit one's)."""
    emptied = []
    pending = [(source, dest)]
    while pending:
        src, dst = pending.pop()
        src_parent, dst_parent = open_path(root_fd, src[:-1]), open_path(root_fd, dst[:-1] or ())
        try:
            # (a symlink to "." or above leads to the root itself)
            there = saferoot.lstat_at(dst_parent, dst[-1]) if dst else os.fstat(root_fd)
            st = os.lstat(src[-1], dir_fd=src_parent)
            if there is None or (overlayfs.is_whiteout(there) and not overlayfs.is_whiteout(st)):
                if there is not None:
                    os.unlink(dst[-1], dir_fd=dst_parent)
                os.rename(src[-1], dst[-1], src_dir_fd=src_parent, dst_dir_fd=dst_parent)
                _rebase(implicit, src, dst)
                _rebase(whiteouts, src, dst)
                if there is not None and stat.S_ISDIR(st.st_mode):
                    # In place of what the layer deleted: a new directory, hiding the lower one.
                    os.setxattr(saferoot.proc_path(dst_parent, dst[-1]), opaque_key, b"y",
                                follow_symlinks=False)
                    implicit.discard(dst)
                continue
            if not (stat.S_ISDIR(there.st_mode) and stat.S_ISDIR(st.st_mode)):
                continue  # the entry there stays; the source goes with its directory
            if dst and dst in implicit and src not in implicit:
                _copy_dir_attributes_at(src_parent, src[-1], dst_parent, dst[-1])
                implicit.discard(dst)
            if src in whiteouts:
                whiteouts.add(dst)
            src_fd = os.open(src[-1], saferoot.DIR_FLAGS, dir_fd=src_parent)
            try:
                names = os.listdir(src_fd)
            finally:
                os.close(src_fd)
            pending.extend((src + (n,), dst + (n,)) for n in names)
            emptied.append(src)
        finally:
            os.close(src_parent)
            os.close(dst_parent)
    for src in reversed(emptied):
        parent = open_path(root_fd, src[:-1])
        try:
            saferoot.remove_tree_at(parent, src[-1])  # empty, but for entries that gave way
        finally:
            os.close(parent)
        gone = {p for p in implicit | whiteouts if p[:len(src)] == src}
        implicit -= gone
        whiteouts -= gone


def _copy_dir_attributes_at(src_parent, src_name, dst_parent, dst_name):
    src = os.open(src_name, saferoot.DIR_FLAGS, dir_fd=src_parent)
    try:
        dst = os.open(dst_name, saferoot.DIR_FLAGS, dir_fd=dst_parent)
        try:
            for key in os.listxattr(dst):
                os.removexattr(dst, key)
            copy_dir_attributes(src, dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def copy_dir_attributes(src_fd, dst_fd):
    """Owner, mode, xattrs (overlayfs' opaque mark too) and times of a directory."""
    st = os.fstat(src_fd)
    for key in os.listxattr(src_fd):
        os.setxattr(dst_fd, key, os.getxattr(src_fd, key))
    os.fchown(dst_fd, st.st_uid, st.st_gid)
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _identity(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def link_tree(src_fd, dst_fd):
    """Make the empty directory `dst_fd` a copy of `src_fd`'s tree: directories made anew
    with their attributes, everything else hardlinked. Iterative, at most _KEEP_OPEN
    pairs of handles held whatever the depth (deeper ones are reopened through "..")."""
    # [src fd or None, dst fd or None, names left, (src identity, dst identity) once closed]
    stack = [[os.dup(src_fd), os.dup(dst_fd), sorted(os.listdir(src_fd), reverse=True), None]]
    try:
        while stack:
            here = stack[-1]
            if here[2]:
                name = here[2].pop()
                st = os.lstat(name, dir_fd=here[0])
                if not stat.S_ISDIR(st.st_mode):
                    os.link(name, name, src_dir_fd=here[0], dst_dir_fd=here[1], follow_symlinks=False)
                    continue
                os.mkdir(name, 0o700, dir_fd=here[1])
                src = os.open(name, saferoot.DIR_FLAGS, dir_fd=here[0])
                dst = os.open(name, saferoot.DIR_FLAGS, dir_fd=here[1])
                stack.append([src, dst, sorted(os.listdir(src), reverse=True), None])
                if len(stack) > _KEEP_OPEN:
                    far = stack[-_KEEP_OPEN - 1]
                    if far[0] is not None:
                        far[3] = (_identity(far[0]), _identity(far[1]))
                        os.close(far[0])
                        os.close(far[1])
                        far[0] = far[1] = None
                continue
            if len(stack) > 1 and stack[-2][0] is None:
                parents = [os.open("..", saferoot.DIR_FLAGS, dir_fd=fd) for fd in here[:2]]
                stack[-2][0], stack[-2][1] = parents
                if (_identity(parents[0]), _identity(parents[1])) != stack[-2][3]:
                    raise OSError(errno.EBUSY, "directory moved while being copied")
            copy_dir_attributes(here[0], here[1])
            stack.pop()
            os.close(here[0])
            os.close(here[1])
    finally:
        for entry in stack:
            for fd in entry[:2]:
                if fd is not None:
                    os.close(fd)
