"""The mount stage: an overlayfs view of an unpacked image, and its undoing.

The layers' overlay dirs (from tosi-unpack) are the lowerdirs, topmost first,
named by their short links inside the overlay dir so the option string stays
small, as the original tosi did. Writes go to `<mount point>.upper` (with
`<mount point>.work` as overlayfs' scratch dir), next to the mount point.
"""

import errno
import logging
import os
import stat

from . import overlay, saferoot
from .cache import DEFAULT_WORKDIR, Workdir
from .digest import Digest
from .errors import MountError, PlanError
from .plan import check_cache_paths, check_layer_record, quote

log = logging.getLogger("tosi.mount")

# overlayfs wants two lowerdirs when there is no upperdir; a one-layer image
# mounted read-only gets this empty one below it.
EMPTY_LOWER = ".tosi-empty"
ATTRS_PREFIX = ".tosi-attrs-"


def side_dirs(target):
    """(mount point, upperdir, workdir), absolute and normalized ("dir/" == "dir")."""
    target = os.path.abspath(target)
    if target == "/":
        raise MountError("refusing to mount over /")
    return target, target + ".upper", target + ".work"


def overlay_dir_for(image, layers=None, overlaydir=None, workdir=None):
    """Where the layers' overlay dirs and short links are: the flag, else the workdir's.
    Never where a plan says: its "overlay" and "link" fields are checked against
    this directory (lowerdirs), not followed."""
    if overlaydir:
        return os.path.abspath(overlaydir)
    return Workdir(workdir or image.get("workdir") or DEFAULT_WORKDIR).overlays


def lowerdirs(layers, overlaydir):
    """The layers' lowerdirs topmost first, as names inside `overlaydir`: the short
    link where the plan names one, else the layer's own <hex> directory.

    Each is derived from the layer's digest: a plan whose "overlay" is not
    `overlaydir`/<hex>, or whose "link" is not a name there leading to <hex>, is
    refused (PlanError).

    overlayfs refuses a directory twice; the lower copies of a repeated layer
    are left out, since its topmost copy shadows them and their whiteouts only
    hide what that copy's whiteouts hide already."""
    workdir = Workdir(os.path.dirname(overlaydir), overlaydir)
    result = []
    for layer in reversed(layers):
        where = f"layer {layer.get('index')}"
        link, path = layer.get("link"), layer.get("overlay")
        if link is None and path is None:
            raise PlanError(
                f"{where} ({quote(layer.get('digest'))}) has no overlay dir: "
                "unpack the plan with tosi-unpack (without --into) first")
        check_layer_record(layer, where)
        check_cache_paths(layer, workdir, where, ("overlay",))
        hexname = Digest(layer["digest"]).hex
        own = os.path.join(overlaydir, hexname)
        if not os.path.isdir(own) or os.path.islink(own):
            raise MountError(f"{where} ({layer['digest']}): overlay dir {own} is missing; "
                             "run tosi-unpack again")
        name = hexname
        if link is not None:
            try:
                target = os.readlink(os.path.join(overlaydir, link))
            except OSError:
                target = None  # gone: the layer's own name does as well
            if target is not None and target != hexname:
                raise PlanError(f"{where}: link {quote(link)} in {overlaydir} does not lead to "
                                f"{layer['digest']}'s overlay dir; run tosi-unpack again")
            if target is not None:
                name = link
        result.append(name)
    return list(dict.fromkeys(result))


# ---------------------------------------------------------------- implicit directories
#
# A layer extracted alone gives a directory it does not name (a parent of its entries,
# the root without a "./" entry) mode 0755, owner 0:0 and no xattrs, and overlayfs shows
# those over what the lower layers say. The image's own lowerdir on top of the others,
# holding just those directories (and their parents) with the attributes a flat
# extraction has, puts them right; it depends on the exact list of layers only.


def _implicit_dirs(layer_dir):
    try:
        with open(layer_dir + overlay.IMPLICIT_SUFFIX, "rb") as f:
            names = f.read().split(b"\0")
    except FileNotFoundError:
        return frozenset()
    return frozenset(() if n == b"." else tuple(os.fsdecode(n).split("/")) for n in names if n)


def _lstat(layer_dir, parts):
    try:
        return os.lstat(os.path.join(layer_dir, *parts))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _is_opaque(layer_dir, parts):
    try:
        return os.getxattr(os.path.join(layer_dir, *parts), overlay.OPAQUE_XATTR,
                           follow_symlinks=False) == b"y"
    except OSError:
        return False


def _shadowed(parts, st):
    if not overlay.is_whiteout(st):
        log.warning("/%s is a %s in a lower layer, and a directory in a layer above that does "
                    "not name it: overlayfs shows the directory, an -extractto tree does not",
                    "/".join(parts), "symlink" if stat.S_ISLNK(st.st_mode) else "file")


def _attributes_from(dirs, implicit, parts):
    """(layer index, lstat) of the entry whose attributes the view must show at `parts`,
    or None when the topmost layer holding it shows the right ones: it names the
    directory, or what is below is deleted or hidden."""
    top = None
    for index, layer_dir in enumerate(dirs):
        for depth in range(1, len(parts)):
            above = _lstat(layer_dir, parts[:depth])
            if above is not None and not stat.S_ISDIR(above.st_mode):
                if top is not None:
                    _shadowed(parts[:depth], above)
                return None
        st = _lstat(layer_dir, parts)
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                if top is not None:
                    _shadowed(parts, st)
                return None
            if parts not in implicit[index]:
                return None if top is None else (index, st)
            if top is None:
                top = index
        if any(_is_opaque(layer_dir, parts[:depth]) for depth in range(1, len(parts))):
            return None
    return None


def _attribute_fixes(dirs, implicit):
    """{parts: (layer index, lstat)} for the implicit directories whose view is wrong, and
    for their parents (the image's lowerdir holds them too, so it must say what the view
    says), their own attributes where they are right."""
    fixes = {}
    for parts in sorted({p for names in implicit for p in names}, key=len):
        found = _attributes_from(dirs, implicit, parts)
        if found is not None:
            fixes[parts] = found
    for parts in list(fixes):
        for depth in range(len(parts)):
            above = parts[:depth]
            if above not in fixes:
                found = _attributes_from(dirs, implicit, above)
                if found is None:
                    index = next(i for i, d in enumerate(dirs) if _lstat(d, above) is not None)
                    found = index, _lstat(dirs[index], above)
                fixes[above] = found
    return fixes


def _attributes_lower(ovdir, lowers):
    """The name (in ovdir) of the image's lowerdir that puts implicit directories right,
    made if missing; None when no layer needs it."""
    dirs = [os.path.realpath(os.path.join(ovdir, lower)) for lower in lowers]
    implicit = [_implicit_dirs(d) for d in dirs]
    if not any(implicit):
        return None
    import hashlib  # off the warm path of images that need no such lowerdir
    import secrets

    key = hashlib.sha256("\0".join(dirs).encode()).hexdigest()[:32]
    name = ATTRS_PREFIX + key
    final = os.path.join(ovdir, name)
    if os.path.isdir(final):
        return name  # made by an earlier mount of these layers: no walk over them again
    fixes = _attribute_fixes(dirs, implicit)
    if not fixes:
        return None
    # Not ".tmp-<hex>-": unpack removes those as temporaries of dead extractions.
    tmp = os.path.join(ovdir, f"{name}.{secrets.token_hex(4)}")
    try:
        os.mkdir(tmp)
        ordered = sorted(fixes, key=len)
        for parts in ordered:
            if parts:
                os.mkdir(os.path.join(tmp, *parts))
        for parts in reversed(ordered):  # deepest first: a mkdir below changes a parent's mtime
            _copy_attributes(os.path.join(dirs[fixes[parts][0]], *parts), os.path.join(tmp, *parts),
                             fixes[parts][1])
        os.rename(tmp, final)
    except OSError as exc:
        saferoot.remove_tree(tmp)
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(final):
            raise
        # another mount made it meanwhile
    except BaseException:
        saferoot.remove_tree(tmp)
        raise
    return name


def _copy_attributes(source, target, st):
    for key in os.listxattr(source, follow_symlinks=False):
        if not key.startswith(overlay.OVERLAY_XATTR_PREFIXES):
            os.setxattr(target, key, os.getxattr(source, key, follow_symlinks=False))
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def _is_empty_dir(path):
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _prepare_dir(path, what):
    """Create `path` if missing; returns True if it was created here."""
    try:
        os.mkdir(path, 0o755)
        return True
    except FileExistsError:
        if not os.path.isdir(path):
            raise MountError(f"{what} {path} exists and is not a directory") from None
        return False


def _inherit_root(upper, top_lower):
    """Give a fresh upperdir the mode and owner of the top layer's root, as containerd's
    overlay snapshotter does: the upperdir's root is the mounted root, and mkdir's 0755
    root:root would hide what the layer's "./" entry said."""
    st = os.stat(top_lower)
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, stat.S_IMODE(st.st_mode))


def _check_mount_point(target):
    if os.path.ismount(target) or overlay.mount_at(target):
        raise MountError(f"{target} is already a mount point; "
                         f"unmount it first (tosi-mount --unmount {target})")
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise MountError(f"mount point {target} exists and is not a directory")
        if not _is_empty_dir(target):
            raise MountError(f"mount point {target} is not empty")


def check_mountable(target, read_only=False, keep_upper=False):
    """Everything that can be refused before any work: privilege, a mount point that
    holds a mount or is not an empty directory, a leftover upperdir."""
    target, upper, _work = side_dirs(target)
    if not overlay.has_mount_privilege():
        raise MountError("mounting overlayfs needs root (CAP_SYS_ADMIN); run tosi-mount "
                         "as root, or unpack a flat tree with tosi-unpack --into instead")
    _check_mount_point(target)
    if not read_only and os.path.isdir(upper) and not _is_empty_dir(upper) and not keep_upper:
        raise MountError(
            f"{upper} holds the changes of an earlier mount; mount with them with "
            f"tosi-mount --keep-upper, or discard them with tosi-mount --unmount --clean {target}")


def mount_image(image, layers, target, overlaydir=None, workdir=None, read_only=False,
                keep_upper=False, api="auto"):
    """Mount the plan's layers at `target`; returns the image record's "mount" field."""
    target, upper, work = side_dirs(target)
    ovdir = overlay_dir_for(image, layers, overlaydir, workdir)
    lowers = lowerdirs(layers, ovdir)
    if not lowers:
        raise MountError("the image has no layers to mount")
    check_mountable(target, read_only, keep_upper)
    attributes = _attributes_lower(ovdir, lowers)
    if attributes is not None:
        lowers.insert(0, attributes)
    if read_only and len(lowers) == 1:
        empty = os.path.join(ovdir, EMPTY_LOWER)
        os.makedirs(empty, exist_ok=True)
        lowers.append(EMPTY_LOWER)
    created = []
    try:
        for path, what in ((target, "mount point"),) + (
                () if read_only else ((upper, "upperdir"), (work, "workdir"))):
            if _prepare_dir(path, what):
                created.append(path)
        if not read_only and _is_empty_dir(upper):
            _inherit_root(upper, os.path.join(ovdir, lowers[0]))
        used = overlay.mount_overlay(
            target, lowers, None if read_only else upper, None if read_only else work,
            relative_to=ovdir, read_only=read_only, api=api)
    except BaseException:
        for path in reversed(created):
            try:
                os.rmdir(path)
            except OSError:
                pass
        raise
    log.info("mounted %d layers at %s with %s", len(layers), target,
             "mount(2)" if used == "mount" else "the new mount API")
    return {
        "target": target,
        "upper": None if read_only else upper,
        "work": None if read_only else work,
        "readOnly": bool(read_only),
        "overlaydir": ovdir,
    }


def unmount_image(target, clean=False):
    """Unmount the overlay at `target`; with `clean`, also remove its upper and work
    dirs and the (then empty) mount point. Returns True if a lazy detach was needed."""
    target, upper, work = side_dirs(target)
    mounted = overlay.mount_at(target)
    detached = False
    if mounted is None:
        if not clean:
            raise MountError(f"{target} is not a mount point")
        log.info("%s is not mounted; only cleaning up", target)
    else:
        fstype = mounted[0]
        if fstype != overlay.OVERLAY:
            raise MountError(f"{target} holds a {fstype} mount, not an overlay; "
                             "refusing to unmount it")
        detached = overlay.unmount(target)
        if detached:
            log.warning("%s was busy: detached lazily (MNT_DETACH); it goes away when "
                        "the last user lets go", target)
    if clean:
        if detached:
            raise MountError(f"{target} is still in use, so its upper and work dirs "
                             "were kept; run --clean again once nothing uses it")
        for path in (upper, work):
            if os.path.lexists(path):
                saferoot.remove_tree(path)
        if os.path.isdir(target) and not os.path.islink(target) and _is_empty_dir(target):
            os.rmdir(target)
    return detached
