"""A reference model of OCI layer semantics (image-spec layer.md), for differential tests.

Deliberately simple: the rootfs is a dict {path parts: Node}; a hardlink is a
second path to the same Node object. Each layer is read with Python's tarfile
(independent of tosi's own reader) and applied in two steps:

  1. the layer's own tree: its entries in tar order, a later entry replacing an
     earlier one of the same name; missing parents are implicit directories;
  2. onto the lower tree: whiteouts and opaque markers delete LOWER entries
     only (and so does any non-directory entry, even one a directory replaces
     later in the layer), then the layer's entries are laid over what is left (a directory
     over a directory keeps the lower children and takes the new attributes;
     anything else replaces the lower entry with all it holds; an implicit
     directory keeps the lower directory as it was).

A character device 0/0 is what overlayfs takes for a whiteout: as an entry it
replaces what the layer put at its name before, and as a whiteout it deletes the
lower entries there (docker's overlay2 and containerd's overlayfs snapshotter
show it so).

Symlinks are never followed in entry names: the stacks given to the model keep
every parent a real directory. `snapshot()` returns what
tests.support.staging.snapshot() reads from a real tree, so the two compare
with ==.
"""

import gzip
import hashlib
import io
import stat
import tarfile
from dataclasses import dataclass, field

import zstandard

OPAQUE = ".wh..wh..opq"
WHITEOUT = ".wh."
DIR, REG, SYM, CHR, BLK, FIFO = "dir", "reg", "sym", "chr", "blk", "fifo"
_S_IFMT = {DIR: stat.S_IFDIR, REG: stat.S_IFREG, SYM: stat.S_IFLNK, CHR: stat.S_IFCHR,
           BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_KINDS = {tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: SYM, tarfile.CHRTYPE: CHR,
          tarfile.BLKTYPE: BLK, tarfile.FIFOTYPE: FIFO}


@dataclass(eq=False)  # identity matters: a hardlink is the same Node under two paths
class Node:
    kind: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    data: bytes = b""
    target: str = ""
    rdev: tuple = (0, 0)
    xattrs: dict = field(default_factory=dict)
    implicit: bool = False  # a parent the layer did not name


def implicit_dir():
    return Node(DIR, implicit=True)


def parts_of(name):
    return tuple(p for p in name.split("/") if p not in ("", "."))


def layer_tar(layer):
    """The uncompressed tar of a tests.support.images.Layer."""
    if layer.data[:2] == b"\x1f\x8b":
        return gzip.decompress(layer.data)
    if layer.data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(layer.data)
    return layer.data


def _node(member, tar):
    # overlayfs' own xattrs are the mount's business: a layer's are dropped.
    xattrs = {key[len("SCHILY.xattr."):]: value.encode("utf-8", "surrogateescape")
              for key, value in member.pax_headers.items() if key.startswith("SCHILY.xattr.")
              and not key[len("SCHILY.xattr."):].startswith(("trusted.overlay.", "user.overlay."))}
    kind = _KINDS.get(member.type, REG)
    node = Node(kind, stat.S_IMODE(member.mode), member.uid, member.gid,
                int(member.mtime * 1_000_000_000), xattrs=xattrs)
    if kind == REG:
        node.data = tar.extractfile(member).read()
    elif kind == SYM:
        node.target = member.linkname
    elif kind in (CHR, BLK):
        node.rdev = (member.devmajor, member.devminor)
    return node


def _drop(tree, parts, keep_self=False):
    """Delete `parts` and everything below it (only below with keep_self)."""
    n = len(parts)
    for key in [k for k in tree if k[:n] == parts and (len(k) > n or not keep_self)]:
        del tree[key]


def _own_tree(tar_bytes, lower):
    """(own entries {parts: Node}, whiteout paths, opaque dirs) of one layer."""
    own, whiteouts, opaques = {}, [], []

    def parents(parts):
        for i in range(1, len(parts)):
            prefix = parts[:i]
            if prefix not in own:
                own[prefix] = implicit_dir()

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            parts = parts_of(member.name)
            base = parts[-1] if parts else ""
            if base == OPAQUE or base.startswith(WHITEOUT):
                directory = parts[:-1]
                parents(parts)
                if base == OPAQUE:
                    opaques.append(directory)
                else:
                    whiteouts.append(directory + (base[len(WHITEOUT):],))
                continue
            parents(parts)
            if member.type == tarfile.CHRTYPE and member.devmajor == member.devminor == 0:
                _drop(own, parts)
                whiteouts.append(parts)
                continue
            if member.type == tarfile.LNKTYPE:
                target = parts_of(member.linkname)
                node = own.get(target) or lower.get(target)
                if node is None or node.kind == DIR:
                    raise ValueError(f"model: hardlink {member.name} to nothing or a directory")
            else:
                node = _node(member, tar)
            old = own.get(parts)
            if old is not None and not (old.kind == DIR and node.kind == DIR):
                _drop(own, parts)
            if node.kind != DIR:
                # Applied in tar order, a non-directory removes what lower layers have
                # there, even if a directory of the same name follows (docker does so too).
                whiteouts.append(parts)
            own[parts] = node
    return own, whiteouts, opaques


def implicit_dirs(tar_bytes):
    """The directories a layer holds without naming them, whose attributes are therefore
    the lower layers' (the root unless a "./" entry names it; not those the layer
    deletes below it first, which are new)."""
    own, whiteouts, _ = _own_tree(tar_bytes, {})
    named_root = any(not parts_of(m.name) for m in tarfile.open(fileobj=io.BytesIO(tar_bytes)))
    found = [parts for parts, node in own.items() if node.implicit and parts not in whiteouts]
    return ([] if named_root else [()]) + sorted(found)


def apply_layer(tree, tar_bytes):
    """Apply one layer's tar to `tree` in place."""
    own, whiteouts, opaques = _own_tree(tar_bytes, tree)
    for parts in whiteouts:
        _drop(tree, parts)
    for parts in opaques:
        _drop(tree, parts, keep_self=True)
    for parts in sorted(own, key=len):
        node = own[parts]
        old = tree.get(parts)
        if node.implicit:
            if old is not None and old.kind == DIR:
                continue
            node = Node(DIR)
        if old is not None and not (old.kind == DIR and node.kind == DIR):
            _drop(tree, parts)
        tree[parts] = node


def rootfs(layers):
    """The tree a stack of tests.support.images.Layer makes, bottom first."""
    tree = {(): Node(DIR)}
    for layer in layers:
        apply_layer(tree, layer_tar(layer))
    return tree


def snapshot(tree):
    """The tree in the form of tests.support.staging.snapshot() (directory mtimes left out)."""
    entries = {}
    names = {}
    for parts, node in tree.items():
        info = {"type": _S_IFMT[node.kind], "mode": node.mode, "uid": node.uid, "gid": node.gid}
        if node.kind == REG:
            info["sha256"] = hashlib.sha256(node.data).hexdigest()
            info["size"] = len(node.data)
            names.setdefault(id(node), []).append("/".join(parts))
        elif node.kind == SYM:
            info["target"] = node.target
            info.pop("mode")
        elif node.kind in (CHR, BLK):
            info["rdev"] = node.rdev
        if node.kind != SYM:
            info["xattrs"] = dict(node.xattrs)
        if node.kind != DIR:
            info["mtime"] = node.mtime_ns
        entries["/".join(parts) or "."] = info
    for group in names.values():
        if len(group) > 1:
            for name in group:
                entries[name]["links"] = sorted(group)
    return entries
