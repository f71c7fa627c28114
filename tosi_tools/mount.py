"""The mount stage: an overlayfs view of an unpacked image, and its undoing.

The layers' overlay dirs (from tosi-unpack) are the lowerdirs, topmost first,
named by their short links inside the overlay dir so the option string stays
small, as the original tosi did. Writes go to `<mount point>.upper` (with
`<mount point>.work` as overlayfs' scratch dir), next to the mount point.

Without root (no CAP_SYS_ADMIN) the layer dirs are in the user form (see
tosi_tools.overlayfs) and the mount is made in a user namespace held by a process
of its own, or by fuse-overlayfs (tosi_tools.userns chooses); layer dirs of
root's form are refused there, and a mount never mixes the two forms.
"""

import errno
import logging
import os
import stat

from . import chain, overlayfs, ownership, saferoot
from .cache import (
    DEFAULT_WORKDIR, TRUSTED_FORM, USER_FORM, Workdir, read_form, require_cached, shared_lock, workdir_for,
)
from .errors import MountError, PlanError, UnsafePath, UsageError, counted, flag, for_command, quoted
from .plan import LayerRecord, check_cache_paths

log = logging.getLogger("tosi.mount")

# overlayfs wants two lowerdirs when there is no upperdir; a one-layer image
# mounted read-only gets this empty one below it.
EMPTY_LOWER = Workdir.EMPTY_LOWER


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


def _not_unpacked(layer):
    return PlanError(f"layer {layer.get('index')} ({layer.get('digest')}) has no overlay dir: "
                     "unpack the plan with tosi-unpack (without --into) first")


def lowerdirs(layers, overlaydir):
    """The layers' lowerdirs topmost first, as names inside `overlaydir`: the short
    link where the plan names one, else the layer's own <hex> directory.

    Each is derived from the layer's digest: a plan whose "overlay" is not
    `overlaydir`/<hex>, or whose "link" is not a name there leading to <hex>, is
    refused (PlanError).

    A layer whose root is opaque hides every layer below it: those are left out.
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
                f"{where} ({quoted(layer.get('digest'))}) has no overlay dir: "
                "unpack the plan with tosi-unpack (without --into) first")
        layer = LayerRecord.of(layer, where)
        check_cache_paths(layer, workdir, where, ("overlay",))
        hexname = layer.digest.hex
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
                raise PlanError(f"{where}: link {quoted(link)} in {overlaydir} does not lead to "
                                f"{layer['digest']}'s overlay dir; run tosi-unpack again")
            if target is not None:
                name = link
        result.append(name)
        if _root_is_opaque(own):
            break  # the layer hides all below it, which overlayfs does not do for a layer's root
    return list(dict.fromkeys(result))


def _root_is_opaque(layer_dir):
    """Whether the layer's root directory carries the opaque mark (a "./.wh..wh..opq")."""
    fd = os.open(layer_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return overlayfs.is_opaque(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- implicit directories
#
# A layer extracted alone gives a directory it does not name (a parent of its entries,
# the root without a "./" entry) mode 0755, owner 0:0 and no xattrs, and overlayfs shows
# those over what the lower layers say. The image's own lowerdir on top of the others,
# holding just those directories (and their parents) with the attributes a flat
# extraction has, puts them right; it depends on the exact list of layers only.


def _implicit_dirs(layer_dir):
    """The layer's implicit directories, as "/"-joined names ("" for its root)."""
    return chain.dirs_record(layer_dir, Workdir.IMPLICIT_SUFFIX)


def _whiteout_dirs(layer_dir):
    """The layer's directories that hold whiteout devices, as _implicit_dirs gives them."""
    return chain.dirs_record(layer_dir, Workdir.WHITEOUTS_SUFFIX)


def _split_path(path):
    parent, _, name = path.rpartition("/")
    return parent, name


def _shadowed(path, st):
    if not overlayfs.is_whiteout(st):
        log.warning("/%s is a %s in a lower layer, and a directory in a layer above that does "
                    "not name it: overlayfs shows the directory, an -extractto tree does not",
                    path, "symlink" if stat.S_ISLNK(st.st_mode) else "file")


def _dir_state(fd):
    """(fstat, opaque, xattrs to copy) of an open directory of a layer."""
    opaque = overlayfs.is_opaque(fd)
    try:
        keys = os.listxattr(fd)
    except OSError:
        keys = ()
    xattrs = tuple((key, os.getxattr(fd, key)) for key in keys
                   if not key.startswith(overlayfs.OVERLAY_XATTR_PREFIXES))
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


def _lone_dir(states, context):
    """The index of the one layer that makes the directory the view shows at a path, or
    None when the path is no directory in the view or more than one layer make it up
    (overlayfs merges it then, and hides the whiteout devices its layers hold)."""
    found = None
    for index, (state, (blocked, opaque_above)) in enumerate(zip(states, context)):
        if blocked is not None:
            break
        if state is not None:
            if not stat.S_ISDIR(state[0].st_mode):
                break
            if found is not None:
                return None
            found = index
            if state[1]:
                break
        if opaque_above:
            break
    return found


def _attribute_fixes(dirs, implicit, whiteouts=None):
    """{path: (layer index, state)} for the implicit directories whose view is wrong, for
    the directories holding whiteout devices that only one layer makes up in the view
    (overlayfs lists such a directory as it is, devices included; one more lowerdir
    having it merges it), and for their parents (the image's lowerdir holds them too, so
    it must say what the view says), their own attributes where they are right.

    Each layer is walked once, top-down, over those directories and their parents
    only; then one pass down that tree decides each of them from what the layers hold
    there and above. Linear in their number times the layers, whatever the depth."""
    whiteouts = whiteouts or [frozenset()] * len(dirs)
    lone = set().union(*whiteouts) - {""}  # the root is merged: there are two lowerdirs at least
    named = set().union(*implicit) | lone
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
        found, shadowed = _attributes_from(path, states, context, implicit)
        if found is None and path in lone:
            index = _lone_dir(states, context)
            if index is not None and path in whiteouts[index]:
                found = index, states[index]
        decided[path] = found, shadowed
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


def _attributes_lower(wd, lowers):
    """The name (in the overlay dir of `wd`, a Workdir) of the image's lowerdir that puts
    implicit directories right, made if missing; None when no layer needs it."""
    ovdir = wd.overlays
    dirs = [os.path.realpath(os.path.join(ovdir, lower)) for lower in lowers]
    implicit = [_implicit_dirs(d) for d in dirs]
    whiteouts = [_whiteout_dirs(d) for d in dirs]
    if not any(implicit) and not any(whiteouts):
        return None
    key = chain.attributes_key(dirs)
    name = wd.attributes_lower_name(key)
    final = wd.attributes_lower_path(key)
    try:
        made = os.lstat(final)
    except FileNotFoundError:
        made = None
    if made is not None:
        require_cached(final, made, "attributes lowerdir")
        if stat.S_ISDIR(made.st_mode):
            return name  # made by an earlier mount of these layers: no walk over them again
    fixes = _attribute_fixes(dirs, implicit, whiteouts)
    if not fixes:
        return None
    tmp = wd.attributes_lower_temp_path(key)
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


# ---------------------------------------------------------------- side directories
#
# The mount point, <mount point>.upper and <mount point>.work usually sit in a place
# other users can write (/tmp): they may have made any of these names first, as a
# symlink to a directory of root's or as a directory full of their own files. Each
# is therefore looked at with lstat / O_NOFOLLOW, never through a symlink, and used
# only when it is a real directory that is ours; their parent must be one where
# nobody else can swap them (ownership.require_safe_ancestors).
#
# Two marks say what tosi made, as trusted.* xattrs, which only CAP_SYS_ADMIN can
# set (mounting needs it too), so another user cannot forge them:
# - MADE_XATTR on a mount point tosi created: --unmount --clean removes only such a
#   mount point (one the user made stays);
# - UPPER_XATTR on an upperdir tosi made, holding the mount point's path: its root
#   takes the image root's owner and mode (_inherit_root), so that ownership alone
#   cannot tell it is ours. It lives in overlayfs' private trusted.overlay.* space,
#   which the mount never shows.

MADE_XATTR = "trusted.tosi.made"
UPPER_XATTR = "trusted.overlay.tosi.upper"
# Without root, the mount point's mark is a user.* xattr: only its owner (or root) can
# set one, and --clean asks the mount point to be ours as well. An upperdir made
# without root keeps the user's ownership, which is enough.
MADE_USER_XATTR = "user.tosi.made"
_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SIDE_FIX = ("another user may have made it: remove it, or choose another mount point "
             "(tosi never follows or reuses a name beside a mount point that is not its own)")


def _lstat_or_none(path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _refuse_kind(path, st, what):
    """UnsafePath for a name that is not a real directory."""
    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
    raise UnsafePath(f"{what} {path} is {kind}; {_SIDE_FIX}", path=path)


def _open_side_dir(path, what):
    """An O_NOFOLLOW fd on the directory `path` (UnsafePath for anything else)."""
    try:
        return os.open(path, _DIR_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _refuse_kind(path, os.lstat(path), what)
        raise


def _mark(fd, key, value):
    try:
        os.setxattr(fd, key, value)
    except OSError as exc:
        log.debug("cannot set %s (%s): what tosi made is not recorded", key, exc.strerror)


def _has_mark(fd, key, value):
    try:
        return os.getxattr(fd, key) == value
    except OSError:
        return False


def _check_upper(upper, fd, st, target):
    """An existing upperdir is ours: marked by tosi for this mount point, or a directory
    of ours only we can write (an upperdir prepared by hand, or by an older tosi)."""
    if not stat.S_ISDIR(st.st_mode):
        _refuse_kind(upper, st, "upperdir")
    if _has_mark(fd, UPPER_XATTR, os.fsencode(target)):
        return
    ownership.check_own_dir_stat(upper, st, "upperdir", _SIDE_FIX)


def _check_side_dirs(target, upper, work):
    """Refuse an upper or work dir beside `target` that is not ours (nothing is changed)."""
    st = _lstat_or_none(upper)
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            _refuse_kind(upper, st, "upperdir")
        fd = _open_side_dir(upper, "upperdir")
        try:
            _check_upper(upper, fd, os.fstat(fd), target)
        finally:
            os.close(fd)
    st = _lstat_or_none(work)
    if st is not None:
        ownership.check_own_dir_stat(work, st, "overlay work dir", _SIDE_FIX)


def _prepare_mount_point(target):
    """Create the mount point (marked as tosi's) or check the one there; True if made."""
    try:
        os.mkdir(target, 0o700)
    except FileExistsError:
        _check_mount_point(target)
        return False
    fd = os.open(target, _DIR_NOFOLLOW)
    try:
        ownership.check_own_dir_stat(target, os.fstat(fd), "mount point", _SIDE_FIX)
        os.fchmod(fd, 0o755)
        _mark(fd, MADE_XATTR if overlayfs.has_mount_privilege() else MADE_USER_XATTR, b"mountpoint")
    finally:
        os.close(fd)
    return True


def _hold_mount_point(target):
    """An O_PATH fd on the mount point made or checked before, for mount(2) to use instead
    of its name. The first look at its ancestors may have found one missing, which
    another user could have made since (and then swapped what tosi made in it): now that
    everything below them exists they are checked again (before anything is made beside
    the mount point), and the name is still what was checked; from then on the safe
    chain keeps the names beside it too."""
    ownership.require_safe_ancestors(target, "mount point", complete=True)
    try:
        fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _refuse_kind(target, os.lstat(target), "mount point")
        raise
    try:
        held = os.fstat(fd)
        ownership.check_own_dir_stat(target, held, "mount point", _SIDE_FIX)
        now = _lstat_or_none(target)
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise UnsafePath(f"{target} was replaced while tosi prepared the mount; {_SIDE_FIX}",
                             path=target)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _prepare_upper(upper, target):
    """(fd, created) of the upperdir: made here (0700, marked) or an existing one of ours."""
    created = True
    try:
        os.mkdir(upper, 0o700)
    except FileExistsError:
        created = False
    fd = _open_side_dir(upper, "upperdir")
    try:
        st = os.fstat(fd)
        if created:
            ownership.check_own_dir_stat(upper, st, "upperdir", _SIDE_FIX)
            _mark(fd, UPPER_XATTR, os.fsencode(target))
        else:
            _check_upper(upper, fd, st, target)
    except BaseException:
        os.close(fd)
        raise
    return fd, created


def _inherit_root(upper_fd, top_lower):
    """Give a fresh upperdir the mode and owner of the top layer's root, as containerd's
    overlay snapshotter does: the upperdir's root is the mounted root, and mkdir's 0755
    root:root would hide what the layer's "./" entry said. Through the upperdir's fd,
    never a path another user could have swapped for a symlink."""
    st = os.stat(top_lower)
    os.fchown(upper_fd, st.st_uid, st.st_gid)
    os.fchmod(upper_fd, stat.S_IMODE(st.st_mode))


def _check_mount_point(target):
    st = _lstat_or_none(target)
    if st is not None and stat.S_ISLNK(st.st_mode):
        _refuse_kind(target, st, "mount point")
    if os.path.ismount(target) or overlayfs.mount_at(target):
        raise UsageError(f"{target} is already a mount point; "
                         f"unmount it first (tosi-mount --unmount {target})")
    if not overlayfs.has_mount_privilege():
        from . import userns  # off root's warm path

        holder = userns.find_holder(target)
        if holder is not None:
            raise MountError(f"{target} is already mounted in the user namespace of process "
                             f"{holder}; unmount it first (tosi-mount --unmount {target})")
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"mount point {target} exists and is not a directory")
        if st.st_uid != os.geteuid():
            raise UnsafePath(f"mount point {target} is owned by uid {st.st_uid}, not by uid "
                             f"{os.geteuid()}; {_SIDE_FIX}", path=target)
        if not _is_empty_dir(target):
            raise UsageError(f"mount point {target} is not empty")


KERNEL = "kernel"


def _require_privilege():
    """How this process mounts: KERNEL (it holds CAP_SYS_ADMIN), else userns.USERNS or
    userns.FUSE; MountError, one line saying what is needed, when it cannot."""
    if overlayfs.has_mount_privilege():
        return KERNEL
    from . import userns  # off root's warm path

    return userns.method()


def _layers_form(ovdir, lowers, how):
    """The one form of the layer dirs `lowers` (names in `ovdir`); MountError for a mix,
    or for root's form without root."""
    forms = {read_form(os.path.realpath(os.path.join(ovdir, lower))) for lower in lowers}
    if len(forms) > 1:
        raise MountError(f"the layers in {ovdir} were extracted some by root and some without: "
                         "a mount reads one form only; unpack them again in a workdir of your own")
    form = forms.pop()
    if form == TRUSTED_FORM and how != KERNEL:
        raise MountError(f"the layers in {ovdir} were extracted by root (trusted.overlay xattrs), "
                         "which a mount without root cannot read; unpack them as this user in a "
                         "workdir of your own")
    return form


# ---------------------------------------------------------------- mount options
#
# The generic per-mount flags as mount(8) names them, by group; a later one of a group wins.
_OPTIONS = {
    "nosuid": "suid", "suid": "suid",
    "nodev": "dev", "dev": "dev",
    "noexec": "exec", "exec": "exec",
    "noatime": "atime", "relatime": "atime", "strictatime": "atime",
    "nodiratime": "diratime", "diratime": "diratime",
}


def parse_mount_options(texts):
    """{group: option} of what `texts` (comma-separated lists) ask for; UsageError for
    an option tosi does not pass on."""
    chosen = {}
    for text in texts or ():
        for name in text.split(","):
            name = name.strip()
            if not name:
                continue
            if name in ("ro", "rw"):
                raise UsageError(f"mount option {name!r}: use {flag('read-only')} "
                                 "for a read-only mount")
            if name not in _OPTIONS:
                raise UsageError(f"unknown mount option {name!r}; known: {', '.join(_OPTIONS)}")
            chosen[_OPTIONS[name]] = name
    return chosen


def mount_flags(target, options=()):
    """(the VFS flags the mount at `target` gets, a warning or None).

    Where other users can reach the mount point (its parent chain grants them search),
    the image's setuid files and device nodes would work for them: the mount is then
    nosuid,nodev, as fstab's `user` option makes it, unless `options` say suid or dev,
    which earns a warning."""
    target = os.path.abspath(target)
    chosen = parse_mount_options(options)
    reachable = ownership.reachable_by_others(os.path.dirname(target))
    if reachable:
        chosen.setdefault("suid", "nosuid")
        chosen.setdefault("dev", "nodev")
    flags = [name for name in overlayfs.VFS_FLAGS if name in chosen.values()]
    lifted = [chosen[group] for group in ("suid", "dev") if chosen.get(group) == group]
    warning = None
    if reachable and lifted:
        what = " and ".join({"suid": "setuid files", "dev": "devices"}[name] for name in lifted)
        warning = (f"{target} is reachable by other users and mounted with {','.join(lifted)}: "
                   f"the image's {what} work for them")
    return flags, warning


def check_mountable(target, read_only=False, keep_upper=False, mount_options=()):
    """Everything that can be refused before any work: privilege, bad mount options, a
    mount point in a place others can swap, one that holds a mount or is not an empty
    directory of ours, an upper or work dir that is not ours, a leftover upperdir: UsageError
    (exit 2) or UnsafePath, as for a non-empty --into target; MountError without the privilege."""
    target, upper, work = side_dirs(target)
    parse_mount_options(mount_options)
    _require_privilege()
    ownership.require_safe_ancestors(target, "mount point")
    _check_mount_point(target)
    if read_only:
        return
    _check_side_dirs(target, upper, work)
    if os.path.lexists(upper) and not _is_empty_dir(upper) and not keep_upper:
        raise UsageError(
            f"{upper} holds the changes of an earlier mount; " + for_command(
                f"mount with them with tosi-mount --keep-upper, or discard them with "
                f"tosi-mount --unmount --clean {target}",
                f"tosi does not mount over them: mount with -read-only, or choose another "
                f"mount point, or discard them with tosi-mount --unmount --clean {target} "
                "(tosi-mount --keep-upper mounts with them)"))


def mount_image(image, layers, target, overlaydir=None, workdir=None, read_only=False,
                keep_upper=False, api="auto", mount_options=()):
    """Mount the plan's layers at `target`; returns the image record's "mount" field.

    `workdir` is a Workdir or a path; without it, the plan's workdir is used if it
    is a tosi workdir (cache.workdir_for). It and the overlay dir are checked
    (cache.Workdir.check) before anything in them is looked at."""
    target, upper, work = side_dirs(target)
    how = _require_privilege()
    flags, warning = mount_flags(target, mount_options)
    for layer in layers:  # a plan never unpacked is told so before the workdir is looked at
        if layer.get("link") is None and layer.get("overlay") is None:
            raise _not_unpacked(layer)
    wd = workdir_for(workdir, image, default=DEFAULT_WORKDIR)
    ovdir = overlay_dir_for(image, layers, overlaydir, wd.root)
    wd = workdir_for(wd, overlaydir=ovdir).check()
    # Shared with other mounts, exclusive for tosi-gc: what it removes is never a lowerdir
    # chosen here and not yet in /proc/self/mountinfo.
    with shared_lock(wd.mount_lock_path()):
        return _mount_lowers(layers, target, upper, work, ovdir, wd, flags, warning,
                             read_only, keep_upper, api, mount_options, how)


def _mount_lowers(layers, target, upper, work, ovdir, wd, flags, warning, read_only,
                  keep_upper, api, mount_options, how):
    lowers = lowerdirs(layers, ovdir)
    if not lowers:
        raise MountError("the image has no layers to mount")
    check_mountable(target, read_only, keep_upper, mount_options)
    form = _layers_form(ovdir, lowers, how)
    if how != KERNEL:
        from . import userns
    lowers = chain.chain_lowers(wd.overlays, lowers, form)
    attributes = _attributes_lower(wd, lowers)
    if attributes is not None:
        lowers.insert(0, attributes)
    if read_only and len(lowers) == 1:
        ownership.make_own_dir(wd.empty_lower_path(), 0o755, "empty lowerdir")
        lowers.append(wd.EMPTY_LOWER)
    created = []
    upper_fd = target_fd = None
    try:
        if _prepare_mount_point(target):
            created.append(target)
        target_fd = _hold_mount_point(target)
        if not read_only:
            upper_fd, made = _prepare_upper(upper, target)
            if made:
                created.append(upper)
            if ownership.make_own_dir(work, 0o700, "overlay work dir", _SIDE_FIX):
                created.append(work)
            if _is_empty_dir(upper):
                _inherit_root(upper_fd, os.path.join(ovdir, lowers[0]))
        holder = None
        if how == KERNEL:
            used = overlayfs.mount_overlay(
                target, lowers, None if read_only else upper, None if read_only else work,
                relative_to=ovdir, read_only=read_only, api=api, flags=flags,
                userxattr=form == USER_FORM, target_fd=target_fd)
        elif how == userns.USERNS:
            holder = userns.start_holder(
                target, lowers, None if read_only else upper, None if read_only else work,
                ovdir, read_only, api, flags)
            used = "a user namespace"
        else:
            userns.mount_fuse(target, [os.path.join(ovdir, lower) for lower in lowers],
                              None if read_only else upper, None if read_only else work, flags)
            used = "fuse-overlayfs"
    except BaseException:
        for path in reversed(created):
            try:
                os.rmdir(path)
            except OSError:
                pass
        raise
    finally:
        for fd in (upper_fd, target_fd):
            if fd is not None:
                os.close(fd)
    log.info("mounted %s at %s with %s%s", counted(len(layers), "layer"), target,
             {"mount": "mount(2)", "fsmount": "the new mount API"}.get(used, used),
             f" ({','.join(flags)})" if flags else "")
    if warning:
        log.warning("%s", warning)
    if holder is not None:
        # The view is not at the mount point in the caller's namespace: say where it is.
        log.warning("mounted without root in the user namespace of process %d: the image is at %s",
                    holder, userns.reach(holder, target))
    record = {
        "target": target,
        "upper": None if read_only else upper,
        "work": None if read_only else work,
        "readOnly": bool(read_only),
        "overlaydir": ovdir,
        "options": flags,
    }
    if how != KERNEL:
        record["rootless"] = how
    if holder is not None:
        record["holder"] = holder
        record["view"] = f"/proc/{holder}/root{target}"
    return record


def _remove_side_dir(parent_fd, path, what, target):
    """Remove `path` (in the directory `parent_fd`) if it is a directory tosi made for
    `target`; returns None, or why it was left alone."""
    name = os.path.basename(path)
    try:
        fd = os.open(name, _DIR_NOFOLLOW, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.lstat(name, dir_fd=parent_fd)
        return f"{what} {path} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a directory'}"
    try:
        st = os.fstat(fd)
        ours = st.st_uid == os.geteuid() or (
            what == "upperdir" and _has_mark(fd, UPPER_XATTR, os.fsencode(target)))
    finally:
        os.close(fd)
    if not ours:
        return f"{what} {path} is owned by uid {st.st_uid}, not by uid {os.geteuid()}"
    if os.geteuid() != 0:
        _open_up(parent_fd, name)
    saferoot.remove_tree_at(parent_fd, name)
    return None


def _open_up(parent_fd, name):
    """Give the directories overlayfs made mode 0 in a work dir of ours (work/work,
    work/index) their owner's access back: without root, removing them needs it."""
    fd = os.open(name, _DIR_NOFOLLOW, dir_fd=parent_fd)
    try:
        for entry in os.listdir(fd):
            st = os.lstat(entry, dir_fd=fd)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o700:
                os.chmod(entry, 0o700, dir_fd=fd)
    finally:
        os.close(fd)


def _clean(target, upper, work):
    """--clean: remove the upper and work dirs and the mount point tosi made, nothing else."""
    ownership.require_safe_ancestors(target, "mount point")
    try:
        parent_fd = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        left = [(path, why) for path, why in (
            (upper, _remove_side_dir(parent_fd, upper, "upperdir", target)),
            (work, _remove_side_dir(parent_fd, work, "overlay work dir", target))) if why]
        name = os.path.basename(target)
        try:
            fd = os.open(name, _DIR_NOFOLLOW, dir_fd=parent_fd)
        except OSError:
            fd = None  # gone, or not a directory: nothing of ours
        if fd is not None:
            try:
                made = (os.fstat(fd).st_uid == os.geteuid()
                        and (_has_mark(fd, MADE_XATTR, b"mountpoint")
                             or _has_mark(fd, MADE_USER_XATTR, b"mountpoint")))
            finally:
                os.close(fd)
            if made:
                try:
                    os.rmdir(name, dir_fd=parent_fd)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    log.warning("mount point %s is not empty: left in place", target)
            else:
                log.info("mount point %s was not made by tosi: left in place", target)
    finally:
        os.close(parent_fd)
    if left:
        raise UnsafePath("; ".join(why for _, why in left) + ": not made by tosi, so left alone "
                         "(another user may have made it); remove it yourself if it is yours",
                         path=left[0][0])


def unmount_image(target, clean=False):
    """Unmount the overlay at `target`; with `clean`, also remove its upper and work
    dirs and the (then empty) mount point. Returns True if a lazy detach was needed."""
    from . import userns

    target, upper, work = side_dirs(target)
    mounted = overlayfs.mount_at(target)
    detached = False
    holder = userns.find_holder(target) if mounted is None else None
    if holder is not None:
        userns.release(holder, target)
        log.info("ended process %d, the user namespace holding %s", holder, target)
    elif mounted is None:
        if not clean:
            raise MountError(f"{target} is not a mount point")
        log.info("%s is not mounted; only cleaning up", target)
    elif mounted[0] == userns.FUSE_FSTYPE:
        userns.unmount_fuse(target)
    else:
        fstype = mounted[0]
        if fstype != overlayfs.OVERLAY:
            raise MountError(f"{target} holds a {fstype} mount, not an overlay; "
                             "refusing to unmount it")
        detached = overlayfs.unmount(target)
        if detached:
            log.warning("%s was busy: detached lazily (MNT_DETACH); it goes away when "
                        "the last user lets go", target)
    if clean:
        if detached:
            raise MountError(f"{target} is still in use, so its upper and work dirs "
                             "were kept; run --clean again once nothing uses it")
        _clean(target, upper, work)
    return detached
