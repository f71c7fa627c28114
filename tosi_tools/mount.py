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
from .cache import DEFAULT_WORKDIR, Workdir, require_cached, workdir_for
from .errors import MountError, PlanError

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


def overlay_dir_for(image, layers, overlaydir=None, workdir=None):
    """Where the layers' overlay dirs and short links are: flag, plan, or workdir."""
    if overlaydir:
        return os.path.abspath(overlaydir)
    for layer in layers:
        if isinstance(layer.get("overlay"), str):
            return os.path.dirname(os.path.abspath(layer["overlay"]))
    return Workdir(workdir or image.get("workdir") or DEFAULT_WORKDIR).overlays


def _not_unpacked(layer):
    return PlanError(f"layer {layer.get('index')} ({layer.get('digest')}) has no overlay dir: "
                     "unpack the plan with tosi-unpack (without --into) first")


def lowerdirs(layers, overlaydir):
    """The layers' lowerdirs topmost first: short link names where they resolve,
    else the overlay dir's absolute path.

    overlayfs refuses a directory twice; the lower copies of a repeated layer
    are left out, since its topmost copy shadows them and their whiteouts only
    hide what that copy's whiteouts hide already."""
    result = []
    for layer in reversed(layers):
        link, path = layer.get("link"), layer.get("overlay")
        if link is None and path is None:
            raise _not_unpacked(layer)
        if isinstance(link, str) and link:
            candidate = link if os.path.isabs(link) else os.path.join(overlaydir, link)
            if os.path.isdir(candidate):
                inside = os.path.dirname(os.path.abspath(candidate)) == overlaydir
                result.append(os.path.basename(candidate) if inside else candidate)
                continue
        if isinstance(path, str) and os.path.isdir(path):
            result.append(os.path.abspath(path))
            continue
        raise MountError(
            f"layer {layer.get('index')} ({layer.get('digest')}): overlay dir "
            f"{path or link} is missing; run tosi-unpack again")
    return list(dict.fromkeys(result))


# ---------------------------------------------------------------- implicit directories
#
# A layer extracted alone gives a directory it does not name (a parent of its entries,
# the root without a "./" entry) mode 0755, owner 0:0 and no xattrs, and overlayfs shows
# those over what the lower layers say. The image's own lowerdir on top of the others,
# holding just those directories (and their parents) with the attributes a flat
# extraction has, puts them right; it depends on the exact list of layers only.


def _implicit_dirs(layer_dir):
    """The layer's implicit directories, as "/"-joined names ("" for its root)."""
    try:
        with open(layer_dir + overlay.IMPLICIT_SUFFIX, "rb") as f:
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


def _split_path(path):
    parent, _, name = path.rpartition("/")
    return parent, name


def _shadowed(path, st):
    if not overlay.is_whiteout(st):
        log.warning("/%s is a %s in a lower layer, and a directory in a layer above that does "
                    "not name it: overlayfs shows the directory, an -extractto tree does not",
                    path, "symlink" if stat.S_ISLNK(st.st_mode) else "file")


def _dir_state(fd):
    """(fstat, opaque, xattrs to copy) of an open directory of a layer."""
    try:
        opaque = os.getxattr(fd, overlay.OPAQUE_XATTR) == b"y"
    except OSError:
        opaque = False
    try:
        keys = os.listxattr(fd)
    except OSError:
        keys = ()
    xattrs = tuple((key, os.getxattr(fd, key)) for key in keys
                   if not key.startswith(overlay.OVERLAY_XATTR_PREFIXES))
    return os.fstat(fd), opaque, xattrs


def _walk_layer(layer_dir, index, tree):
    """Record in each node of `tree` what layer `index` has at its path: a directory's
    _dir_state, (lstat, False, ()) for anything else, None for nothing (or nothing
    reachable: below a missing entry or a non-directory). One open per directory, each
    from its parent's handle: no path is resolved twice, and none is too long."""

    def enter(parent_fd, node):
        try:
            fd = os.open(node.name, saferoot.DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = saferoot.lstat_at(parent_fd, node.name)
            if st is not None:
                node.data[1][index] = (st, False, ())
            return None
        node.data[1][index] = _dir_state(fd)
        return fd

    fd = os.open(layer_dir, saferoot.DIR_FLAGS)
    try:
        tree.data[1][index] = _dir_state(fd)
        saferoot.walk_tree(fd, tree, enter)
    finally:
        os.close(fd)


def _attributes_from(path, states, context, implicit):
    """(layer index, state) of the entry whose attributes the view must show at `path`,
    or None when the topmost layer holding it shows the right ones: it names the
    directory, or what is below is deleted or hidden; and the (path, lstat) of a lower
    non-directory that overlayfs shows as a directory (an -extractto tree does not), if any.

    `states` are the layers' entries at `path` (topmost first), `context` per layer the
    (path, lstat) of a non-directory above `path` or None, and whether a directory
    above `path` (the root aside) is opaque."""
    top = None
    for index, (state, (blocked, opaque_above)) in enumerate(zip(states, context)):
        if blocked is not None:
            return None, blocked if top is not None else None
        if state is not None:
            if not stat.S_ISDIR(state[0].st_mode):
                return None, (path, state[0]) if top is not None else None
            if path not in implicit[index]:
                return (None if top is None else (index, state)), None
            if top is None:
                top = index
        if opaque_above:
            return None, None
    return None, None


def _context_below(path, states, context):
    """The context (see _attributes_from) of the entries in the directory at `path`."""
    below = []
    for state, (blocked, opaque_above) in zip(states, context):
        if blocked is None and state is not None:
            if not stat.S_ISDIR(state[0].st_mode):
                blocked = (path, state[0])
            elif path and state[1]:
                opaque_above = True
        below.append((blocked, opaque_above))
    return below


def _attribute_fixes(dirs, implicit):
    """{path: (layer index, state)} for the implicit directories whose view is wrong, and
    for their parents (the image's lowerdir holds them too, so it must say what the view
    says), their own attributes where they are right.

    Each layer is walked once, top-down, over the implicit directories and their
    parents only; then one pass down that tree decides each of them from what the
    layers hold there and above. Linear in their number times the layers, whatever
    the depth."""
    named = set().union(*implicit)
    tree, nodes = saferoot.tree_of(named, "", _split_path)
    for path, node in nodes.items():
        node.data = (path, [None] * len(dirs))
    for index, layer_dir in enumerate(dirs):
        _walk_layer(layer_dir, index, tree)
    decided = {}
    stack = [(tree, [(None, False)] * len(dirs))]
    while stack:
        node, context = stack.pop()
        path, states = node.data
        decided[path] = _attributes_from(path, states, context, implicit)
        if node.children:
            below = _context_below(path, states, context)
            stack.extend((child, below) for child in node.children)
    warned = set()

    def attributes(path):
        found, shadowed = decided[path]
        if shadowed is not None and shadowed[0] not in warned:
            warned.add(shadowed[0])
            _shadowed(*shadowed)
        return found

    fixes = {}
    for path in sorted(named, key=len):
        found = attributes(path)
        if found is not None:
            fixes[path] = found
    for path in list(fixes):  # shortest first: a parent met in fixes has all of its own
        while path:
            path = _split_path(path)[0]
            if path in fixes:
                break
            found = attributes(path)
            if found is None:
                states = nodes[path].data[1]
                found = next((i, s) for i, s in enumerate(states) if s is not None)
            fixes[path] = found
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
    try:
        made = os.lstat(final)
    except FileNotFoundError:
        made = None
    if made is not None:
        require_cached(final, made, "attributes lowerdir")
        if stat.S_ISDIR(made.st_mode):
            return name  # made by an earlier mount of these layers: no walk over them again
    fixes = _attribute_fixes(dirs, implicit)
    if not fixes:
        return None
    # Not ".tmp-<hex>-": unpack removes those as temporaries of dead extractions.
    tmp = os.path.join(ovdir, f"{name}.{secrets.token_hex(4)}")
    try:
        os.mkdir(tmp)
        _make_tree(tmp, fixes)
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


def _make_tree(top, fixes):
    """The directories of `fixes` (a tree: every parent is in it) in `top`, with their
    attributes, deepest first (a mkdir below changes a parent's mtime)."""
    tree, nodes = saferoot.tree_of(fixes, "", _split_path)
    for path, found in fixes.items():
        nodes[path].data = found[1]

    def make(parent_fd, node):
        os.mkdir(node.name, 0o700, dir_fd=parent_fd)
        return os.open(node.name, saferoot.DIR_FLAGS, dir_fd=parent_fd)

    fd = os.open(top, saferoot.DIR_FLAGS)
    try:
        saferoot.walk_tree(fd, tree, make, _copy_attributes)
    finally:
        os.close(fd)


def _copy_attributes(fd, node):
    st, _opaque, xattrs = node.data
    for key, value in xattrs:
        os.setxattr(fd, key, value)
    os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


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


def _require_privilege():
    if not overlay.has_mount_privilege():
        raise MountError("mounting overlayfs needs root (CAP_SYS_ADMIN); run tosi-mount "
                         "as root, or unpack a flat tree with tosi-unpack --into instead")


def check_mountable(target, read_only=False, keep_upper=False):
    """Everything that can be refused before any work: privilege, a mount point that
    holds a mount or is not an empty directory, a leftover upperdir."""
    target, upper, _work = side_dirs(target)
    _require_privilege()
    _check_mount_point(target)
    if not read_only and os.path.isdir(upper) and not _is_empty_dir(upper) and not keep_upper:
        raise MountError(
            f"{upper} holds the changes of an earlier mount; mount with them with "
            f"tosi-mount --keep-upper, or discard them with tosi-mount --unmount --clean {target}")


def mount_image(image, layers, target, overlaydir=None, workdir=None, read_only=False,
                keep_upper=False, api="auto"):
    """Mount the plan's layers at `target`; returns the image record's "mount" field.

    `workdir` is a Workdir or a path; without it, the plan's workdir is used if it
    is a tosi workdir (cache.workdir_for). It and the overlay dir are checked
    (cache.Workdir.check) before anything in them is looked at."""
    target, upper, work = side_dirs(target)
    _require_privilege()
    for layer in layers:  # a plan never unpacked is told so before the workdir is looked at
        if layer.get("link") is None and layer.get("overlay") is None:
            raise _not_unpacked(layer)
    wd = workdir_for(workdir, image, default=DEFAULT_WORKDIR)
    ovdir = overlay_dir_for(image, layers, overlaydir, wd.root)
    workdir_for(wd, overlaydir=ovdir).check()
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
