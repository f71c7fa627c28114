"""Apply one layer (an OCI changeset tar) to a root directory.

Three modes, each a Layout (chosen once per layer by layout_for):
  flat     (FlatLayout) the layer is applied on top of what the root holds (bottom layer
           first): whiteouts delete, opaque markers empty directories of what
           lower layers put there.
  staged   (StagedLayout) the layer is applied alone into an empty directory, to be
           moved into a flat root later (the staging module): its deletions of
           lower entries are recorded, not done, and what a move could not make
           exactly as flat would is noted (LayerStats.unmergeable).
  overlay  (OverlayLayout) the root is an empty directory that becomes one overlayfs lowerdir:
           a whiteout becomes a 0/0 character device and an opaque marker the
           trusted.overlay.opaque=y xattr (root's form) or user.overlay.opaque=y (the
           form of anyone else, for a "userxattr" mount: overlayfs.USER_FORM); the
           kernel does the rest at mount time.

OCI semantics both modes keep: a whiteout hides entries of LOWER layers only;
entries of the same layer stay whatever the order of the tar, so a whiteout or
opaque marker that comes after the layer's own entries spares them.

A character device 0/0 in a layer's tar is what overlayfs takes for a whiteout,
and so does every runtime that stores layers as overlayfs lowerdirs (docker's
overlay2, containerd's overlayfs snapshotter: they mknod it as it comes). Both
modes make it that, with a warning: like any entry it replaces what the layer
put at its name before, and it deletes (hides) what lower layers have there.
No real device has that number, so nothing usable is lost.

Every name goes through saferoot (resolved inside the root, never following a
symlink it creates or meets at the last component). Directory modes and mtimes
are set when the layer is done, so read-only directories still get their
contents and directory mtimes are not disturbed by them.

The pieces: `_Applier` makes one layer's entries (files, directories, links,
nodes) through `_Applier.place`; its Layout decides what whiteouts, opaque
markers and devices 0/0 do and keeps the bookkeeping that needs; its
FileQueue hands small files to filewriter's C thread and has the applier
redo what the thread could not make. All state is per layer: nothing is kept
between layers but the once-per-process "not running as root" warning.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from . import filewriter, overlayfs, saferoot, space, staging, tarstream
from .cache import start_writeback
from .compression import open_layer
from .digest import Digest
from .errors import DiffIDMismatch, UnpackError, UnsafeEntry, for_command, quoted

log = logging.getLogger("tosi.layer")

FLAT, OVERLAY, STAGED = "flat", "overlay", "staged"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# Docker's AUFS driver kept its own files under these names; any other ".wh..wh." is refused.
AUFS_METADATA = (".wh..wh.aufs", ".wh..wh.plnk", ".wh..wh.orph")
OPAQUE_XATTR = overlayfs.OPAQUE_XATTR
# Not the layer's to take away: overlayfs' own (an opaque marker), the LSM's label.
_KEPT_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "security.selinux")
DEFAULT_MAX_LAYER_BYTES = 64 << 30
DEFAULT_MAX_LAYER_ENTRIES = 10_000_000
# What may follow a tar's end marker: GNU tar pads to 10 KiB records, Go's archive/tar
# writes 1 KiB. The diffID covers it all, so it must be read; past this it is refused.
MAX_TRAILING_BYTES = 1 << 20
_COPY_STEP = 1 << 20  # a file's data is charged to the free-space guard in steps of this
# Overlay mode: the disk is started on a big file's data every this many bytes (cache.start_writeback).
_WRITEBACK_STEP = 8 << 20
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = saferoot.DIR_FLAGS
_NODE_TYPES = {tarstream.CHR: stat.S_IFCHR, tarstream.BLK: stat.S_IFBLK, tarstream.FIFO: stat.S_IFIFO}
WRITER_AFTER_FILES = 64  # below this a layer's files are not worth the writer thread
_UNLIMITED = 1 << 62  # room without a free-space guard


@dataclass
class Limits:
    """Caps for one layer: decompressed bytes and tar entries; and the free space
    (space.Reserve, None: the default rule) the target's filesystem keeps."""

    max_bytes: int = DEFAULT_MAX_LAYER_BYTES
    max_entries: int = DEFAULT_MAX_LAYER_ENTRIES
    reserve: space.Reserve | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, min_free: str | None = None) -> Limits:
        """From TOSI_MAX_LAYER_BYTES, TOSI_MAX_LAYER_ENTRIES, TOSI_MIN_FREE(_INODES);
        `min_free` (a --min-free flag's text) overrides TOSI_MIN_FREE."""
        def number(key, default):
            text = environ.get(key)
            if not text:
                return default
            try:
                value = int(text)
            except ValueError:
                raise UnpackError(f"{key}={text!r} is not a number") from None
            if value <= 0:
                raise UnpackError(f"{key}={text!r} must be positive")
            return value
        return cls(number("TOSI_MAX_LAYER_BYTES", DEFAULT_MAX_LAYER_BYTES),
                   number("TOSI_MAX_LAYER_ENTRIES", DEFAULT_MAX_LAYER_ENTRIES),
                   space.Reserve.from_env(environ, min_free))


@dataclass
class LayerStats:
    entries: int = 0
    bytes: int = 0
    skipped_devices: int = 0
    whiteouts: int = 0
    # overlayfs' own xattrs (trusted.overlay.*, user.overlay.*) the layer carried, dropped;
    # the first as (entry name, xattr name).
    overlay_xattrs: int = 0
    first_overlay_xattr: tuple[str, str] | None = None
    device_whiteouts: int = 0  # character devices 0/0, taken as whiteouts
    # The digest of the decompressed stream: the layer's real diffID (sha256 unless
    # the one to check is sha512).
    diff_id: str | None = None
    # Overlay and staged modes: directories of the layer that no entry names (its root
    # without a ./ entry, parents of entries, an opaque marker's directory), as canonical
    # tuples: the mount shows (the move keeps) the lower layers' attributes for them.
    implicit_dirs: list | None = None
    # Overlay mode: directories holding whiteout devices, as canonical tuples: the mount
    # merges those no lower layer has, since overlayfs lists a lone directory's devices.
    whiteout_dirs: list | None = None
    # What makes a tree dangerous to hand to other users, counted from the tar
    # headers: setuid/setgid regular files, and character/block devices made.
    setuid_files: int = 0
    devices: int = 0
    # With hold_root: the mode and mtime (ns) the layer's last "./" entry gives the
    # root, left for the caller to apply (None: the layer has no such entry).
    root_mode: int | None = None
    root_mtime_ns: int | None = None
    # Staged mode: what the layer deletes of lower layers, in tar order, as
    # (staging.DELETE or staging.EMPTY, literal parts); and why a move into the flat
    # root would not give what applying it there gives (None: it would).
    deletions: list | None = None
    unmergeable: str | None = None
    # Staged mode: every directory an entry was placed in, as canonical tuples.
    entry_dirs: frozenset | None = None


@dataclass
class _DirFixup:
    parts: tuple
    mode: int
    mtime_ns: int


class Layout:
    """How a layer's deletions are written into the root: the part of applying a
    layer that FlatLayout and OverlayLayout do differently, one chosen per layer
    (as umoci's DirRootfs and OverlayfsRootfs).

    This base holds the rules both keep: which entries delete (the `.wh.<name>`
    whiteout, the `.wh..wh..opq` opaque marker, a character device 0/0; AUFS's
    own `.wh..wh.*` files ignored) and the dropping of overlayfs' own xattrs.
    Subclasses say what a deletion does. Every name is resolved by the applier
    (`_Applier.place` and the SafeRoot it holds), never by a layout.
    """

    name: str
    # Where a hardlink's target must already be, for the error that says it is not.
    hardlink_scope: str
    # Hooks of the applier's hot path, None when the layout has nothing to note:
    # called with the canonical parent of every entry placed, and with the path of
    # every entry made.
    note_parent: Callable[[tuple], None] | None = None
    note_made: Callable[[tuple], None] | None = None
    # Where note_made keeps the paths, when it does no more than add them (their
    # parents being there already): files made in a run (_Applier.apply_run) go straight in.
    made_paths: set | None = None

    def whiteout(self, applier: _Applier, name: str, parts: tuple) -> None:
        """Apply an entry whose last component starts with `.wh.`."""
        marker = parts[-1]
        if marker in AUFS_METADATA:
            return  # what AUFS kept for itself: docker and containerd leave it out too
        applier.stats.whiteouts += 1
        directory = parts[:-1]
        if marker == OPAQUE_MARKER:
            self.opaque(applier, name, directory)
            return
        hidden = marker[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise applier.fail(name, "malformed whiteout", UnsafeEntry)
        self.delete(applier, name, directory + (hidden,))

    def device_whiteout(self, applier: _Applier, name: str, parts: tuple) -> None:
        """A character device 0/0: the whiteout of its own name (see the module doc)."""
        applier.stats.whiteouts += 1
        applier.stats.device_whiteouts += 1
        if not parts:
            raise applier.fail(name, "only a directory can stand for the root")
        self.delete_device(applier, name, parts)

    def kept_xattrs(self, stats: LayerStats, name: str, member: tarstream.Entry) -> list:
        """The entry's xattrs but overlayfs' own: copied from an overlay upper directory by
        some image builders, they would make the mount hide or redirect lower entries."""
        xattrs = []
        for xname, value in member.xattrs:
            if xname.startswith(overlayfs.OVERLAY_XATTR_PREFIXES):
                stats.overlay_xattrs += 1
                stats.first_overlay_xattr = stats.first_overlay_xattr or (name, xname)
                continue
            xattrs.append((xname, value))
        return xattrs

    def warn(self, layer_name: str, stats: LayerStats) -> None:
        """One warning per layer for the overlayfs xattrs dropped, one for the devices 0/0 taken."""
        if stats.overlay_xattrs and stats.first_overlay_xattr is not None:
            name, key = stats.first_overlay_xattr
            log.warning("layer %s: dropped %d overlayfs xattr(s) (%s on %r first): overlayfs metadata "
                        "is the mount's, not a layer's", layer_name, stats.overlay_xattrs, key, name)
        if stats.device_whiteouts:
            log.warning("layer %s: %d character device(s) 0/0 taken as whiteouts, as overlayfs takes them",
                        layer_name, stats.device_whiteouts)

    # What each layout does.

    def delete(self, applier: _Applier, name: str, target: tuple) -> None:
        """The whiteout `name` of `target`."""
        raise NotImplementedError

    def delete_device(self, applier: _Applier, name: str, parts: tuple) -> None:
        """The device 0/0 `name` at `parts` (not the root)."""
        raise NotImplementedError

    def opaque(self, applier: _Applier, name: str, directory: tuple) -> None:
        """The opaque marker `name` of `directory`."""
        raise NotImplementedError

    def replaced_dir(self, applier: _Applier, fd: int, name: str, path: tuple) -> None:
        """A directory entry at `path` (open as `fd`) took the place of a non-directory."""

    def reopen_whited_out(self, applier: _Applier, canonical: tuple, name: str) -> bool:
        """Whether the non-directory at `canonical` was made a directory for entry `name` to go under."""
        return False

    def implicit_dirs(self, named_dirs: set) -> list | None:
        """LayerStats.implicit_dirs, once the layer is applied."""
        return None

    def missing_link_target(self, applier: _Applier, name: str, member: tarstream.Entry) -> None:
        """A hardlink whose target is not there: an error, unless the layout can say why (then the entry is skipped)."""
        raise applier.fail(name, f"hardlink target {quoted(member.linkname)} is not in {self.hardlink_scope}")

    def whiteout_dirs(self) -> list | None:
        """LayerStats.whiteout_dirs, once the layer is applied."""
        return None

    def write_behind(self, fd: int, written: int) -> None:
        """`written` more bytes of a big file's data went to `fd`. A flat target is not
        synced: its writeback is left to the kernel."""


class FlatLayout(Layout):
    """The layer applied on top of what the root holds (bottom layer first):
    whiteouts delete, opaque markers empty directories of what lower layers put there."""

    name = FLAT
    hardlink_scope = "the root"

    def __init__(self, has_lower: bool) -> None:
        # Only a root that held something before this layer has lower entries a
        # whiteout may delete; elsewhere whatever exists is this layer's own.
        self.has_lower = has_lower
        # With has_lower: every path this layer made, plus all their ancestors, which
        # its whiteouts and opaque markers must spare.
        self.touched: set[tuple] = set()
        if has_lower:
            self.note_made = self.touch
            self.made_paths = self.touched

    def touch(self, parts: tuple) -> None:
        if not self.has_lower:
            return
        touched = self.touched
        for i in range(len(parts), 0, -1):
            key = parts[:i]
            if key in touched:
                return
            touched.add(key)

    def is_own(self, dir_fd: int, base: str, here: tuple) -> bool:
        """Whether the entry at `here` was made by this layer (not by a lower one)."""
        if self.has_lower:
            return here in self.touched
        return saferoot.lstat_at(dir_fd, base) is not None

    def delete(self, applier: _Applier, name: str, target: tuple) -> None:
        found = self.made_parent(applier, name, target)
        if found is None:
            return  # nothing there to delete
        dir_fd, base, canonical = found
        here = canonical + (base,)
        if self.is_own(dir_fd, base, here):
            # The same layer made this entry; the whiteout only removes what lower
            # layers had there, which for a directory means emptying it of them.
            st = saferoot.lstat_at(dir_fd, base)
            if st is not None and stat.S_ISDIR(st.st_mode):
                if here not in applier.named_dirs:
                    # The lower directory is deleted; the one its entries need is a new one.
                    self.renew_dir(applier, dir_fd, base, name)
                self.opaque(applier, name, here)
            return
        applier.root.remove(dir_fd, base, canonical)

    def delete_device(self, applier: _Applier, name: str, parts: tuple) -> None:
        found = self.made_parent(applier, name, parts)
        if found is not None:
            applier.root.remove(*found)

    def made_parent(self, applier: _Applier, name: str, parts: tuple) -> tuple | None:
        """(dir_fd, base, canonical parent) of what `parts` names, the directories on the
        way made as for any entry: Docker's extraction makes a whiteout's parents before
        it reads it, and an overlay layer has them to hold the whiteout device. None
        when a lower non-directory is on the way (nothing below it to delete)."""
        try:
            placed = applier.root.parent(parts, create=True)
        except NotADirectoryError:
            return None
        except UnsafeEntry as exc:
            raise applier.fail(name, str(exc), UnsafeEntry) from None
        self.touch(placed[2])
        return placed

    def renew_dir(self, applier: _Applier, dir_fd: int, base: str, name: str) -> None:
        """Give a directory the attributes of one made for an entry below it: 0755, ours, no xattrs."""
        fd = os.open(base, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o755)
            if applier.as_root:
                os.fchown(fd, *applier.ids)
            applier.drop_other_xattrs(fd, (), name)
        finally:
            os.close(fd)

    def opaque(self, applier: _Applier, name: str, directory: tuple) -> None:
        fd, canonical = applier.opaque_dir(name, directory)
        try:
            if self.has_lower:
                self.remove_lower(applier.root, fd, canonical)
            self.touch(canonical)
        finally:
            os.close(fd)

    def remove_lower(self, root: saferoot.SafeRoot, fd: int, directory: tuple) -> None:
        """Delete what lower layers left in a directory, keeping this layer's own entries."""
        # Iterative: a layer may nest its directories deeper than Python's stack.
        below = self.remove_lower_in(root, fd, directory)
        while below:
            sub, canonical = root.open_entry_dir(below.pop())
            if sub is None:
                continue
            assert canonical is not None  # given with the directory's fd
            try:
                below += self.remove_lower_in(root, sub, canonical)
            finally:
                os.close(sub)

    def remove_lower_in(self, root: saferoot.SafeRoot, fd: int, directory: tuple) -> list:
        """remove_lower for one directory's entries; the subdirectories of this layer's to visit."""
        visit = []
        for child in os.listdir(fd):
            parts = directory + (child,)
            if parts not in self.touched:
                root.remove(fd, child, directory)
                continue
            st = saferoot.lstat_at(fd, child)
            if st is not None and stat.S_ISDIR(st.st_mode):
                visit.append(parts)
        return visit


class StagedLayout(FlatLayout):
    """The layer applied alone into an empty directory beside a flat root, to be moved
    into it once the layers below are there (staging.merge): its entries are made as
    FlatLayout makes them; its deletions, which are of lower entries, are recorded
    for the move to do first (LayerStats.deletions).

    What a move could not make exactly as applying the layer in the root would is
    noted (LayerStats.unmergeable, the first reason), and the layer is then applied
    in the root instead: a hardlink to a file no entry of the layer made (a lower
    layer's: the entry is skipped here), an SELinux label a directory entry carries
    (the move cannot tell it from the label the directory got here). The directories
    the layer makes without naming them are LayerStats.implicit_dirs, as in overlay
    mode: the move leaves the root's attributes on them.
    """

    name = STAGED
    hardlink_scope = "the layer"

    def __init__(self) -> None:
        super().__init__(has_lower=False)
        self.deletions: list = []
        self.unmergeable: str | None = None
        self.parents: set = set()
        self.note_parent = self.parents.add

    def note(self, reason: str) -> None:
        if self.unmergeable is None:
            self.unmergeable = reason

    def delete(self, applier: _Applier, name: str, target: tuple) -> None:
        super().delete(applier, name, target)  # what it does to the layer's own entries
        self.deletions.append((staging.DELETE, target))

    def delete_device(self, applier: _Applier, name: str, parts: tuple) -> None:
        super().delete_device(applier, name, parts)
        self.deletions.append((staging.DELETE, parts))

    def opaque(self, applier: _Applier, name: str, directory: tuple) -> None:
        super().opaque(applier, name, directory)
        self.parents.add(directory)  # made here if no entry made it: it must be named too
        self.deletions.append((staging.EMPTY, directory))

    def replaced_dir(self, applier: _Applier, fd: int, name: str, path: tuple) -> None:
        # The non-directory the layer had put here first took the place of whatever a
        # lower layer had, a directory with all it held included.
        self.deletions.append((staging.DELETE, path))

    def missing_link_target(self, applier: _Applier, name: str, member: tarstream.Entry) -> None:
        self.note(f"entry {quoted(name)} links to a file of a lower layer")

    def kept_xattrs(self, stats: LayerStats, name: str, member: tarstream.Entry) -> list:
        xattrs = super().kept_xattrs(stats, name, member)
        if member.isdir() and any(key.startswith(staging.LOCAL_XATTR_PREFIXES) for key, _ in xattrs):
            self.note(f"directory {quoted(name)} carries an SELinux label")
        return xattrs

    def implicit_dirs(self, named_dirs: set) -> list:
        """The directories the layer made without naming them: every directory an entry
        went into is a parent noted, a named one's parent included, so those are all."""
        return sorted(parent for parent in self.parents if parent and parent not in named_dirs)


class OverlayLayout(Layout):
    """The root is an empty directory that becomes one overlayfs lowerdir: a
    whiteout becomes a 0/0 character device and an opaque marker the opaque xattr
    of the layer dir's `form` (overlayfs.TRUSTED_FORM: trusted.overlay.opaque=y, which
    needs root; overlayfs.USER_FORM: user.overlay.opaque=y); the kernel does the rest
    at mount time. Everything in the root is this layer's own."""

    name = OVERLAY
    hardlink_scope = "this layer"

    def __init__(self, form: str = overlayfs.TRUSTED_FORM) -> None:
        self.form = form
        self.opaque_xattr = overlayfs.opaque_xattr(form)
        # Directories this layer made opaque, and the whiteout devices it made, by directory.
        self.opaque_dirs: set[tuple] = set()
        self.whiteout_devices: dict[tuple, set[str]] = {}
        # For LayerStats.implicit_dirs: parents entries were placed in, and directories
        # that replace a lower entry (new, not implicit).
        self.parents: set[tuple] = set()
        self.new_dirs: set[tuple] = set()
        self.note_parent = self.parents.add
        self.unflushed = 0  # bytes written since write_behind last started writeback

    def write_behind(self, fd: int, written: int) -> None:
        """Start the disk on a big file's data every _WRITEBACK_STEP bytes as they are
        written, so that the syncfs before the layer is published finds little left
        (the many small files: cache.writing_ahead)."""
        self.unflushed += written
        if self.unflushed >= _WRITEBACK_STEP:
            self.unflushed = 0
            start_writeback(fd)

    def delete(self, applier: _Applier, name: str, target: tuple) -> None:
        # Below a non-directory of this layer's (it hides every lower entry), nothing to
        # delete, as in flat mode (FlatLayout.made_parent).
        placed = applier.place(target, name, none_below_non_dir=True)
        if placed is None:
            return
        dir_fd, base, canonical = placed
        st = saferoot.lstat_at(dir_fd, base)
        if st is not None:
            # The same layer made this entry; the whiteout only hides what lower
            # layers had there, which for a directory means making it opaque.
            if stat.S_ISDIR(st.st_mode):
                here = canonical + (base,)
                self.new_dirs.add(here)
                self.opaque(applier, name, here)
            return
        self.need_root(applier, name, "an overlayfs whiteout device")
        if canonical in self.opaque_dirs:
            return  # the directory hides all lower entries already
        try:
            os.mknod(base, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=dir_fd)
        except FileExistsError:
            pass  # already whited out by an earlier entry of this layer
        self.whiteout_devices.setdefault(canonical, set()).add(base)

    def need_root(self, applier: _Applier, name: str, what: str) -> None:
        # Linux 5.8+ lets anyone make a 0/0 device and set user.* xattrs on their own
        # files: only root's form needs root.
        if self.form == overlayfs.TRUSTED_FORM:
            applier.need_root(name, what)

    def delete_device(self, applier: _Applier, name: str, parts: tuple) -> None:
        self.need_root(applier, name, "an overlayfs whiteout device")
        placed = applier.place(parts, name, none_below_non_dir=True)
        if placed is None:
            return  # below a non-directory of this layer's, as in delete()
        dir_fd, base, canonical = placed
        applier.root.remove(dir_fd, base, canonical)  # what this layer put there before
        if canonical in self.opaque_dirs:
            return  # the directory hides all lower entries already
        os.mknod(base, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=dir_fd)
        self.whiteout_devices.setdefault(canonical, set()).add(base)

    def opaque(self, applier: _Applier, name: str, directory: tuple) -> None:
        self.need_root(applier, name, f"the {self.opaque_xattr} xattr")
        fd, canonical = applier.opaque_dir(name, directory)
        try:
            self.parents.add(canonical)
            self.set_opaque(applier, fd, name, canonical)
        finally:
            os.close(fd)

    def set_opaque(self, applier: _Applier, fd: int, name: str, canonical: tuple) -> None:
        try:
            os.setxattr(fd, self.opaque_xattr, b"y")
        except OSError as exc:
            raise applier.fail(name, f"cannot set {self.opaque_xattr}: {exc.strerror}") from None
        # Lower entries are hidden whole now: whiteouts in it would only show, since
        # overlayfs lists an opaque directory as it is, devices included.
        self.opaque_dirs.add(canonical)
        for base in self.whiteout_devices.pop(canonical, ()):
            st = saferoot.lstat_at(fd, base)
            if st is not None and overlayfs.is_whiteout(st):
                os.unlink(base, dir_fd=fd)

    def replaced_dir(self, applier: _Applier, fd: int, name: str, path: tuple) -> None:
        # The lower entry is gone: for overlayfs the new directory is opaque.
        self.new_dirs.add(path)
        self.set_opaque(applier, fd, name, path)

    def reopen_whited_out(self, applier: _Applier, canonical: tuple, name: str) -> bool:
        """Turn this layer's whiteout device at `canonical` into an opaque directory.

        For a layer that deletes a directory and then puts entries under the same
        name without a directory entry of its own; False if it is something else.
        """
        dir_fd, base, parent = applier.root.parent(canonical, create=False)
        st = saferoot.lstat_at(dir_fd, base)
        if st is None or not overlayfs.is_whiteout(st):
            return False
        os.unlink(base, dir_fd=dir_fd)
        os.mkdir(base, 0o755, dir_fd=dir_fd)
        self.new_dirs.add(tuple(canonical))
        fd, _ = applier.root.open_entry_dir(canonical)
        assert fd is not None  # the directory just made
        try:
            self.set_opaque(applier, fd, name, canonical)
        finally:
            os.close(fd)
        return True

    def implicit_dirs(self, named_dirs: set) -> list:
        """Every ancestor of a placed entry, the root too, that no entry named."""
        found = {()}
        for parent in self.parents:
            while parent not in found:  # up to the first ancestor met already: linear in depth
                found.add(parent)
                parent = parent[:-1]
        return sorted(found - named_dirs - self.new_dirs)

    def whiteout_dirs(self) -> list:
        """Every directory still holding a whiteout device this layer made."""
        return sorted(directory for directory, names in self.whiteout_devices.items() if names)


def layout_for(mode: str, root: saferoot.SafeRoot, form: str | None = None) -> Layout:
    """The Layout for `mode` (FLAT, OVERLAY or STAGED), for a layer about to be applied to `root`;
    `form` is an OVERLAY layer dir's (overlayfs.TRUSTED_FORM or USER_FORM; None: the one
    this process makes, overlayfs.local_form())."""
    if mode == FLAT:
        return FlatLayout(has_lower=bool(os.listdir(root.fd)))
    if mode == STAGED:
        return StagedLayout()
    if mode == OVERLAY:
        return OverlayLayout(form or overlayfs.local_form())
    raise ValueError(f"mode must be {FLAT!r}, {OVERLAY!r} or {STAGED!r}, not {mode!r}")


class FileQueue:
    """A layer's small regular files on their way to filewriter's C thread.

    The thread is started once the layer has shown it has many small files
    (WRITER_AFTER_FILES). The applier asks `spares()` before each entry and
    `sync()`s when the entry could see or change a queued file; `sync()` has
    `redo` (the applier's own code path) make, in order, the files the thread
    could not.
    """

    def __init__(self, root: saferoot.SafeRoot, layer_name: str,
                 redo: Callable[[tuple, str, tarstream.Entry, bytes, str], None]) -> None:
        self.root = root
        self.layer_name = layer_name
        self.redo = redo
        # None: not started yet, False: not to be used, else a filewriter.FileWriter.
        self.writer: Any = None
        self.small_files = 0
        self.queued: set[tuple] = set()  # (canonical parent, name) of files not synced yet
        # The directories those files are in, and all their ancestors (canonical).
        self.queued_dirs: set[tuple] = set()

    def takes(self, member: tarstream.Entry) -> bool:
        """Whether this file goes to the writer: a small plain one, once the layer had many."""
        if not _queueable(member):
            return False
        if self.writer is None:
            self.small_files += 1
            if self.small_files < WRITER_AFTER_FILES:
                return False
            self.writer = False
            if filewriter.available():
                try:
                    self.writer = filewriter.FileWriter()
                except OSError as exc:  # no thread to be had: write here
                    log.debug("layer %s: no file writer (%s)", self.layer_name, exc)
        return bool(self.writer)

    def add(self, dir_fd: int, base: str, canonical: tuple, member: tarstream.Entry, data: bytes,
            name: str, chown: bool, chmod: bool) -> None:
        """Queue a file `takes()` accepted; `chown`, `chmod`: what file_fixes asks."""
        writer = self.writer
        writer.add(dir_fd, base, data, member.mode & 0o7777,
                   (filewriter.CHOWN if chown else 0) | (filewriter.CHMOD if chmod else 0),
                   member.uid, member.gid, _ns(member.mtime), (canonical, base, member, data, name))
        self.queued.add((canonical, base))
        if canonical not in self.queued_dirs:
            self._note_dirs(canonical)
        if writer.full:
            self.sync()

    def _note_dirs(self, canonical: tuple) -> None:
        dirs = self.queued_dirs
        for i in range(len(canonical), 0, -1):
            key = canonical[:i]
            if key in dirs:
                return
            dirs.add(key)

    def spares(self, member: tarstream.Entry, parts: tuple, whiteout: bool) -> bool:
        """Whether this entry may be applied while queued files are still being made.

        A queued file goes on; a directory, symlink or bigger file may too, as long
        as it is not where a queued file goes or a directory queued files are in
        (which it would replace), and needs no parent made.
        Everything else (whiteouts, hardlinks, whose target may be queued, nodes,
        names that exist but for directories) waits for them.
        """
        if whiteout:
            return False
        if member.type == tarstream.REG and _queueable(member):
            return True
        if member.type not in (tarstream.REG, tarstream.DIR, tarstream.SYM) or not parts:
            return False
        try:
            _, base, canonical = self.root.parent(parts, create=False)
        except (OSError, UnsafeEntry):
            return False
        if (canonical, base) in self.queued:
            return False
        # A symlink or file replaces whatever is there: not a directory with queued files
        # in it, below it included (a directory entry keeps one).
        return member.type == tarstream.DIR or canonical + (base,) not in self.queued_dirs

    def sync(self) -> None:
        """Wait for the queued files; redo, in order, those the writer could not make."""
        if not self.writer:
            return
        self.queued.clear()
        self.queued_dirs.clear()
        for canonical, base, member, data, name in self.writer.sync():
            try:
                self.redo(canonical, base, member, data, name)
            except OSError as exc:
                raise os_error(self.layer_name, name, exc) from None

    def close(self) -> None:
        """Stop the writer: before anyone cleans up after a failure, it must have stopped writing."""
        if self.writer:
            self.writer.close()
        self.writer = False


def _queueable(member):
    return member.sparse is None and not member.xattrs and member.data_size <= filewriter.MAX_FILE


@dataclass
class _Applier:
    """Makes one layer's entries in the root, through `place` and the SafeRoot; its
    `layout` says what deletions do, its `files` queue takes small files."""

    root: saferoot.SafeRoot
    layout: Layout
    layer_name: str
    limits: Limits
    as_root: bool
    umask: int = 0o777
    stats: LayerStats = field(default_factory=LayerStats)
    fixups: list = field(default_factory=list)
    # Whether a parent directory hands its group to new files (setgid), by canonical path.
    setgid_dirs: dict = field(default_factory=dict)
    # The directories entries named (their attributes are the layer's).
    named_dirs: set = field(default_factory=set)
    ids: tuple = ()  # our euid and egid: a new file's owner unless told otherwise
    # Leave the root's mode and mtime to the caller (LayerStats.root_mode), who keeps
    # the root private until the whole image is in it.
    hold_root: bool = False
    guard: space.Guard | None = None  # space.Guard of the target's filesystem, None: no reserve kept

    def __post_init__(self):
        self.files = FileQueue(self.root, self.layer_name, self.redo_file)
        # The layout's hooks, looked up once: they are called for every entry.
        self.note_parent = self.layout.note_parent
        self.note_made = self.layout.note_made
        # Whether the files after a queued one may be taken as a run (apply_run).
        self.runs = tarstream.plain_files_available() and (
            self.note_made is None or self.layout.made_paths is not None)
        self.run = None  # (dir_fd, canonical, name prefix, chown all?) for apply_run

    def spend(self, nbytes, inodes=0):
        """Charge what is about to be written to the free-space guard; when a check is
        due, the queued files are written first so that the filesystem shows them."""
        if self.guard is not None and self.guard.charge(nbytes, inodes):
            self.files.sync()
            self.guard.check(upcoming=(nbytes, inodes))

    def fail(self, name, reason, cls=UnpackError):
        return cls(f"layer {self.layer_name}: entry {quoted(name)}: {reason}")

    def need_root(self, name, what):
        if not self.as_root:
            raise self.fail(name, f"making {what} needs root; as another user unpack in the user form "
                        "(the default without root) or "
                            + for_command("with --into", "with -extractto"))

    # ---------------------------------------------------------------- bookkeeping

    def place(self, parts, name, none_below_non_dir=False):
        """(dir_fd, basename, canonical parent) for a new entry, parents made as needed;
        with `none_below_non_dir`, None where a non-directory is on the way (a whiteout
        there has nothing to delete), else that is an error."""
        retried = False
        while True:
            try:
                placed = self.root.parent(parts, create=True)
                if self.note_parent is not None:
                    self.note_parent(placed[2])
                return placed
            except NotADirectoryError as exc:
                if not retried and self.layout.reopen_whited_out(self, tuple(exc.filename.split("/")), name):
                    retried = True
                    continue
                if none_below_non_dir:
                    return None
                raise self.fail(name, f"a parent is not a directory ({exc.filename})") from None
            except UnsafeEntry as exc:
                raise self.fail(name, str(exc), UnsafeEntry) from None

    def opaque_dir(self, name, directory):
        """(fd the caller closes, canonical path) of the directory an opaque marker names,
        made (replacing what is there) unless it is one already."""
        if not directory:
            return os.dup(self.root.fd), ()
        # An opaque directory exists in this layer even when nothing else names it.
        dir_fd, base, canonical = self.place(directory, name)
        st = saferoot.lstat_at(dir_fd, base)
        if st is None or not stat.S_ISDIR(st.st_mode):
            self.root.remove(dir_fd, base, canonical)
            os.mkdir(base, 0o755, dir_fd=dir_fd)
        # Opened where it was made, not looked up again: the symlink it replaced may have
        # been on the way to it ("a/a/.wh..wh..opq" below a -> ".").
        return os.open(base, _DIR_FLAGS, dir_fd=dir_fd), canonical + (base,)

    def setgid(self, dir_fd, canonical):
        """Whether new files in this directory take its group instead of ours."""
        known = self.setgid_dirs.get(canonical)
        if known is None:
            # Directories this layer makes get their modes only at the end, so a
            # stale answer for a replaced directory can only cost a needless fchown.
            known = self.setgid_dirs[canonical] = bool(os.fstat(dir_fd).st_mode & stat.S_ISGID)
        return known

    # ---------------------------------------------------------------- entries

    def apply(self, tar, member):
        """Apply one tarstream.Entry; its data is read from `tar` (a TarReader)."""
        name = member.name
        try:
            parts = saferoot.clean_name(name)
        except UnsafeEntry as exc:
            raise self.fail(name, str(exc), UnsafeEntry) from None
        stats = self.stats
        if stats.entries + stats.whiteouts >= self.limits.max_entries:
            raise UnpackError(f"layer {self.layer_name}: more than {self.limits.max_entries} "
                              "entries (the cap for one layer; see TOSI_MAX_LAYER_ENTRIES)")
        if len(parts) > 1 and parts[0] in AUFS_METADATA:
            return  # inside AUFS's .wh..wh.plnk or .wh..wh.orph
        self.spend(0, 1)
        # Deletions are the layout's: whiteouts, opaque markers, devices 0/0.
        whiteout = bool(parts) and parts[-1].startswith(WHITEOUT_PREFIX)
        files = self.files
        if files.writer and not files.spares(member, parts, whiteout):
            files.sync()
        if whiteout:
            self.layout.whiteout(self, name, parts)
            return
        if member.type == tarstream.CHR and member.devmajor == 0 and member.devminor == 0:
            self.layout.device_whiteout(self, name, parts)
            return
        stats.entries += 1
        xattrs = self.layout.kept_xattrs(stats, name, member) if member.xattrs else ()
        if not parts:
            if not member.isdir():
                raise self.fail(name, "only a directory can stand for the root")
            # The target itself: whatever other xattrs it has are not the layer's to drop.
            self.fix_dir(os.dup(self.root.fd), (), member, xattrs, name, existed=False)
            if self.hold_root:
                fix = self.fixups.pop()
                stats.root_mode, stats.root_mtime_ns = fix.mode, fix.mtime_ns
            return
        if member.type == tarstream.LNK:
            # Resolved before placing the new name, whose lookup may evict the target's handle.
            source = self.link_source(name, member)
            if source is None:
                return  # the layout noted why it is skipped
            try:
                dir_fd, base, canonical = self.place(parts, name)
                if self.note_made is not None:
                    self.note_made(canonical + (base,))
                self.make_hardlink(dir_fd, base, canonical, source)
            finally:
                os.close(source[0])
            return
        if member.type in _NODE_TYPES and _NODE_TYPES[member.type] != stat.S_IFIFO:
            if not self.as_root:
                stats.skipped_devices += 1
                return
            stats.devices += 1
        elif member.type == tarstream.REG and member.mode & 0o6000:
            stats.setuid_files += 1
        dir_fd, base, canonical = self.place(parts, name)
        if self.note_made is not None:
            self.note_made(canonical + (base,))
        if member.isdir():
            self.make_dir(dir_fd, base, canonical, member, xattrs, name)
        elif member.type == tarstream.REG:
            self.make_file(tar, dir_fd, base, canonical, member, xattrs, name)
        elif member.type == tarstream.SYM:
            self.make_symlink(dir_fd, base, canonical, member, xattrs, name)
        elif member.type in _NODE_TYPES:
            self.make_node(dir_fd, base, canonical, member, xattrs, name)
        else:
            raise self.fail(name, f"unsupported tar entry type {member.type!r}")

    def set_xattrs(self, xattrs, name, fd=None, dir_fd=None, base=None):
        """xattrs on an open entry (`fd`) or on `base` inside `dir_fd`, never through a symlink."""
        for key, value in xattrs:
            try:
                if fd is not None:
                    os.setxattr(fd, key, value)
                else:
                    saferoot.setxattr_at(dir_fd, base, key, value)
            except OSError as exc:
                raise self.fail(name, f"cannot set xattr {quoted(key)}: {exc.strerror}") from None

    def make_dir(self, dir_fd, base, canonical, member, xattrs, name):
        if not xattrs and filewriter.make_dir(dir_fd, base, 0o700, member.uid, member.gid, self.as_root):
            self.note_dir(canonical + (base,), member)  # a new directory: fix_dir's work, done
            return
        replaced = existed = False
        try:
            os.mkdir(base, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            st = saferoot.lstat_at(dir_fd, base)
            existed = st is not None and stat.S_ISDIR(st.st_mode)
            if st is None or not stat.S_ISDIR(st.st_mode):
                # A whiteout, or a non-directory of this layer: either way the lower
                # entry is gone (the layout may have to say so).
                replaced = st is not None
                self.root.remove(dir_fd, base, canonical)
                os.mkdir(base, 0o700, dir_fd=dir_fd)
        fd = os.open(base, _DIR_FLAGS, dir_fd=dir_fd)
        if replaced:
            self.layout.replaced_dir(self, fd, name, canonical + (base,))
        self.fix_dir(fd, canonical + (base,), member, xattrs, name, existed)

    def fix_dir(self, fd, parts, member, xattrs, name, existed=True):
        """Owner and xattrs now (closes fd); mode and mtime when the layer is done.

        A directory that was there already (a lower layer's, or named twice) keeps
        only the xattrs this entry names, as overlayfs shows the upper one's alone.
        """
        try:
            if self.as_root:
                os.fchown(fd, member.uid, member.gid)
            if existed:
                self.drop_other_xattrs(fd, xattrs, name)
            self.set_xattrs(xattrs, name, fd=fd)
        finally:
            os.close(fd)
        self.note_dir(tuple(parts), member)

    def note_dir(self, parts, member):
        """A directory the layer names: its mode and mtime are set when the layer is done."""
        self.named_dirs.add(parts)
        self.fixups.append(_DirFixup(parts, stat.S_IMODE(member.mode), _ns(member.mtime)))

    def drop_other_xattrs(self, fd, xattrs, name):
        keep = {key for key, _ in xattrs}
        try:
            present = os.listxattr(fd)
        except OSError:
            return  # a filesystem without xattrs has nothing stale either
        for key in present:
            if key not in keep and not key.startswith(_KEPT_XATTR_PREFIXES):
                try:
                    os.removexattr(fd, key)
                except OSError as exc:
                    raise self.fail(name, f"cannot remove xattr {quoted(key)}: {exc.strerror}") from None

    def make_file(self, tar, dir_fd, base, canonical, member, xattrs, name):
        self.stats.bytes += member.data_size
        files = self.files
        if files.takes(member):
            self.spend(-(-member.size // 4096) * 4096)  # in blocks: a small file takes a whole one
            data = tar.read_data(member.size)
            chown, chmod = self.file_fixes(dir_fd, canonical, member)
            files.add(dir_fd, base, canonical, member, data, name, chown, chmod)
            if self.runs:
                cut = name.rfind("/") + 1
                self.run = (dir_fd, canonical, name[:cut].encode("utf-8", "surrogateescape"),
                            self.as_root and self.setgid(dir_fd, canonical))
            return
        def copy(fd, n):
            while n > 0:
                step = min(n, _COPY_STEP)
                self.spend(step)
                tar.copy_to(fd, step)
                n -= step
                self.write_behind(fd, step)
        if member.sparse is not None:
            def write(fd):
                for offset, size in member.sparse:
                    os.lseek(fd, offset, os.SEEK_SET)
                    copy(fd, size)
                os.ftruncate(fd, member.size)
        else:
            def write(fd):
                copy(fd, member.size)
        self.write_file(dir_fd, base, canonical, member, xattrs, write)

    def apply_run(self, tar):
        """After a queued file, queue the files that follow it in the same directory as
        long as C can take them whole from the buffered tar (TarReader.plain_files: plain
        headers, a PAX header of times before one or not, small, no setuid, a plain name
        after the same prefix, so the same parent).
        Each is what apply() would make of it: counted, charged, queued, noted."""
        dir_fd, canonical, prefix, chown_all = self.run
        self.run = None
        files, stats, guard = self.files, self.stats, self.guard
        made = self.layout.made_paths
        euid, egid = self.ids
        taken = [0, 0]  # data bytes, bytes charged

        def take(dup, batch, tasks, max_files, max_bytes):
            room_bytes, room_inodes = guard.room() if guard is not None else (_UNLIMITED, _UNLIMITED)
            max_files = min(max_files, self.limits.max_entries - stats.entries - stats.whiteouts)
            count, taken[0], taken[1] = tar.plain_files(
                prefix, max_files, max_bytes, filewriter.MAX_FILE, room_bytes, room_inodes, dup, canonical,
                self.as_root, chown_all, euid, egid, self.umask, (batch, tasks, files.queued, made))
            return count, taken[0]

        while files.writer:
            count = files.writer.add_run(dir_fd, take)
            if not count:
                return
            stats.entries += count
            stats.bytes += taken[0]
            if guard is not None:
                guard.hold(taken[1], count)
            if files.writer.full:
                files.sync()  # which may redo files, and so turn the root's handles over
                return

    def write_file(self, dir_fd, base, canonical, member, xattrs, write):
        """Create the regular file `base`; `write(fd)` puts its data in."""
        mode = member.mode & 0o7777
        try:
            fd = os.open(base, _FILE_FLAGS, mode & 0o777, dir_fd=dir_fd)
        except FileExistsError:
            self.root.remove(dir_fd, base, canonical)
            fd = os.open(base, _FILE_FLAGS, mode & 0o777, dir_fd=dir_fd)
        try:
            write(fd)
            chown, chmod = self.file_fixes(dir_fd, canonical, member)
            if chown:
                os.fchown(fd, member.uid, member.gid)
            if chmod:
                os.fchmod(fd, mode)
            self.set_xattrs(xattrs, member.name, fd=fd)
            t = _ns(member.mtime)
            os.utime(fd, ns=(t, t))
        finally:
            os.close(fd)

    def write_behind(self, fd: int, written: int) -> None:
        self.layout.write_behind(fd, written)

    def file_fixes(self, dir_fd, canonical, member):
        """(fchown?, fchmod?) for a new file in `dir_fd`."""
        mode = member.mode & 0o7777
        chown = self.as_root and ((member.uid, member.gid) != self.ids or self.setgid(dir_fd, canonical))
        # the umask trimmed it, or fchown cleared setuid/setgid
        return chown, bool(mode & self.umask or mode & 0o7000)

    def redo_file(self, canonical, base, member, data, name):
        """Make a small file the writer thread could not, through the applier's own code."""
        if isinstance(member, tuple):  # queued by apply_run: the header's fields
            member = tarstream.entry_of(member)
        dir_fd, base, canonical = self.place(canonical + (base,), name)
        self.write_file(dir_fd, base, canonical, member, (), lambda fd: _write_all(fd, data))

    def make_symlink(self, dir_fd, base, canonical, member, xattrs=(), name=None):
        try:
            os.symlink(member.linkname, base, dir_fd=dir_fd)
        except FileExistsError:
            self.root.remove(dir_fd, base, canonical)
            os.symlink(member.linkname, base, dir_fd=dir_fd)
        if self.as_root:
            saferoot.chown_at(dir_fd, base, member.uid, member.gid)
        if xattrs:
            # Linux keeps user.* xattrs off symlinks (EPERM), as containerd's and
            # GNU tar's extraction find: those are left out; any other is the entry's.
            kept = [(key, value) for key, value in xattrs if not key.startswith("user.")]
            if len(kept) < len(xattrs):
                log.debug("%s: user.* xattrs left out: Linux does not keep them on a symlink", name)
            self.set_xattrs(kept, name, dir_fd=dir_fd, base=base)
        saferoot.utime_at(dir_fd, base, _ns(member.mtime))

    def link_source(self, name, member):
        """(dir fd owned by the caller, basename, lstat) of a hardlink's target inside the root;
        None when it is missing and the layout says the entry is skipped."""
        try:
            target = saferoot.clean_name(member.linkname)
        except UnsafeEntry as exc:
            raise self.fail(name, f"hardlink target {exc}", UnsafeEntry) from None
        if not target:
            raise self.fail(name, "hardlink to the root directory")
        try:
            src_fd, src_base, _ = self.root.parent(target, create=False)
        except (FileNotFoundError, NotADirectoryError):
            src_fd = None
        except UnsafeEntry as exc:
            raise self.fail(name, str(exc), UnsafeEntry) from None
        st = saferoot.lstat_at(src_fd, src_base) if src_fd is not None else None
        if st is None or overlayfs.is_whiteout(st):
            # A whiteout device (OverlayLayout's, for a name this layer deleted) is no
            # file: linking to it would make a second whiteout where flat has nothing.
            return self.layout.missing_link_target(self, name, member)
        if stat.S_ISDIR(st.st_mode):
            raise self.fail(name, f"hardlink target {quoted(member.linkname)} is a directory")
        return os.dup(src_fd), src_base, st

    def make_hardlink(self, dir_fd, base, canonical, source):
        src_fd, src_base, st = source
        try:
            os.link(src_base, base, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            existing = saferoot.lstat_at(dir_fd, base)
            if existing is not None and (existing.st_dev, existing.st_ino) == (st.st_dev, st.st_ino):
                return  # a link to itself, or one already made
            self.root.remove(dir_fd, base, canonical)
            os.link(src_base, base, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)

    def make_node(self, dir_fd, base, canonical, member, xattrs, name):
        kind = _NODE_TYPES[member.type]
        device = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
        try:
            os.mknod(base, kind | 0o600, device, dir_fd=dir_fd)
        except FileExistsError:
            self.root.remove(dir_fd, base, canonical)
            os.mknod(base, kind | 0o600, device, dir_fd=dir_fd)
        if self.as_root:
            saferoot.chown_at(dir_fd, base, member.uid, member.gid)
        saferoot.chmod_at(dir_fd, base, stat.S_IMODE(member.mode))
        self.set_xattrs(xattrs, name, dir_fd=dir_fd, base=base)
        saferoot.utime_at(dir_fd, base, _ns(member.mtime))

    # ---------------------------------------------------------------- finish

    def finish(self):
        """Directory modes and mtimes: of a directory named twice, the last entry's.

        One walk down from the root through open handles, deepest first (any order
        would do: chmod and utime of a directory leave its parent's mtime alone), so
        it costs one open per directory however deep they nest.
        """
        last = {fix.parts: fix for fix in self.fixups}
        if not last:
            return
        tree, nodes = saferoot.tree_of(last, (), _split_parts)
        for parts, fix in last.items():
            nodes[parts].data = fix

        def apply(fd, node):
            fix = node.data
            if fix is not None:
                os.fchmod(fd, fix.mode)
                os.utime(fd, ns=(fix.mtime_ns, fix.mtime_ns))

        # Never through a symlink: one may have replaced a directory since (then
        # what was below it is not this layer's to fix either).
        saferoot.walk_tree(self.root.fd, tree, saferoot.open_dir_at_node, apply)


def _still_dirs(root: saferoot.SafeRoot, paths: list | None) -> list | None:
    """The canonical `paths` that are real directories of `root` (never through a symlink)."""
    if paths is None:
        return None
    kept = []
    for parts in paths:
        fd = root.open_canonical_dir(parts)
        if fd is not None:
            os.close(fd)
            kept.append(parts)
    return kept


def _split_parts(parts):
    return parts[:-1], parts[-1]


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def os_error(layer_name: str, name: str | None, exc: OSError) -> UnpackError:
    """The UnpackError for an OSError while making entry `name` (None: not one entry's)."""
    if exc.errno == errno.ENOSPC:
        return UnpackError(f"layer {layer_name}: no space left on the target")
    where = f"entry {quoted(name)}: " if name is not None else ""
    return UnpackError(f"layer {layer_name}: {where}{exc.strerror or exc}")


def _ns(mtime):
    # int seconds, or an exact Fraction (PAX): truncated toward zero, as Go's archive/tar does
    return mtime * 1_000_000_000 if isinstance(mtime, int) else int(mtime * 1_000_000_000)


def current_umask() -> int:
    """The process umask, read without changing it (0o777, forcing chmods, if unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777


def running_as_root() -> bool:
    return os.geteuid() == 0


def diff_id_mismatch(layer_name: str, actual: str, stated: str) -> DiffIDMismatch:
    return DiffIDMismatch(f"layer {layer_name}: uncompressed content hashes to {actual}, not to "
                          f"its diffID {stated}", actual=actual, stated=stated)


_not_root_warned = threading.Lock()


def _warn_not_root() -> None:
    """Once per process (the lock, once taken, is the memory of it; layers extracted in
    parallel would each warn through a plain cache): the owners tar headers name are not kept."""
    if _not_root_warned.acquire(blocking=False):
        log.warning("not running as root: extracted files belong to you, not to the owners the layers name")


def apply_layer(root: saferoot.SafeRoot | str | os.PathLike, stream: BinaryIO, media_type: str | None,
                mode: str = FLAT, layer_name: str = "layer", limits: Limits | None = None,
                diff_id: str | None = None, hold_root: bool = False,
                progress: Callable[[LayerStats], None] | None = None, form: str | None = None) -> LayerStats:
    """Apply the layer blob read from `stream` (any binary reader) to `root`.

    `root` is a SafeRoot or a directory path. Returns LayerStats. Raises
    UnsafeEntry for entries that try to leave the root, ReserveReached when the
    target's filesystem is down to the reserve (limits.reserve), UnpackError
    for everything else that is wrong with the layer (more than
    MAX_TRAILING_BYTES after the tar's end marker included), and DigestMismatch
    when the whole decompressed stream (what follows the end marker included)
    does not hash to `diff_id` (None: not checked), in which case the root
    holds the layer's entries all the same. `mode` (FLAT, OVERLAY or STAGED) chooses the
    Layout (layout_for; `form` the OVERLAY layer dir's, default overlayfs.local_form()).
    overlayfs' own xattrs in the layer are dropped, with one warning.
    With `hold_root`, a "./" entry's mode and mtime are not applied to the root but
    reported (LayerStats.root_mode, root_mtime_ns); its owner and xattrs are.
    `progress(stats)`, if given, is called on this thread after each tar entry (or run
    of small files taken together, _Applier.apply_run) with the LayerStats so far
    (entries and data bytes applied): it must be quick, and whatever it raises stops
    the layer like any failure.
    """
    if mode not in (FLAT, OVERLAY, STAGED):
        raise ValueError(f"mode must be {FLAT!r}, {OVERLAY!r} or {STAGED!r}, not {mode!r}")
    limits = limits or Limits.from_env()
    safe = root if isinstance(root, saferoot.SafeRoot) else saferoot.SafeRoot(os.fspath(root))
    own_root = safe is not root
    as_root = running_as_root()
    applier = _Applier(safe, layout_for(mode, safe, form), layer_name, limits, as_root, current_umask(),
                       ids=(os.geteuid(), os.getegid()), hold_root=hold_root,
                       guard=space.guard(safe.fd, limits.reserve, f"layer {layer_name}", safe.path))
    algorithm = Digest(diff_id).algorithm if diff_id is not None else "sha256"
    hasher = hashlib.new(algorithm)
    data = open_layer(stream, media_type, f"layer {layer_name}", limits.max_bytes, hasher)
    try:
        tar = tarstream.TarReader(data, f"layer {layer_name}")
        entry = None
        for entry in tar:
            applier.apply(tar, entry)
            if applier.run is not None:
                applier.apply_run(tar)
            if progress is not None:
                progress(applier.stats)
        entry = None
        applier.files.sync()
        tar.finish(MAX_TRAILING_BYTES)
        applier.stats.diff_id = f"{algorithm}:{hasher.hexdigest()}"
        if diff_id is not None and applier.stats.diff_id != diff_id:
            raise diff_id_mismatch(layer_name, applier.stats.diff_id, diff_id)
        applier.finish()
        # Only what is still a directory: one the layer made for an entry may have been
        # replaced by a non-directory later in its tar (and its entries with it).
        applier.stats.implicit_dirs = _still_dirs(safe, applier.layout.implicit_dirs(applier.named_dirs))
        applier.stats.whiteout_dirs = _still_dirs(safe, applier.layout.whiteout_dirs())
        if isinstance(applier.layout, StagedLayout):
            applier.stats.deletions = applier.layout.deletions
            applier.stats.unmergeable = applier.layout.unmergeable
            applier.stats.entry_dirs = frozenset(applier.layout.parents)
    except OSError as exc:
        raise os_error(layer_name, entry.name if entry is not None else None, exc) from exc
    finally:
        # Before anyone cleans up after a failure, the writer must have stopped writing.
        applier.files.close()
        if applier.guard is not None:
            applier.guard.close()
        data.close()
        if own_root:
            safe.close()
    applier.layout.warn(layer_name, applier.stats)
    if applier.stats.skipped_devices:
        log.warning("layer %s: skipped %d device node(s): creating them needs root",
                    layer_name, applier.stats.skipped_devices)
    if not as_root:
        _warn_not_root()
    return applier.stats
