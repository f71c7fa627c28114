"""tosi-gc's work: which images a workdir holds, and removing what no kept image uses.

An image is a cached image manifest (manifests/<registry>/<repository>/<algo>:<hex>
that is no index): resolve stored it, with its config, and fetch and unpack added its
layers' blobs and overlay dirs. Beside it, its use record (<algo>:<hex>.used, touched
by every resolve of it) says when it was last used and by which reference; an image
cached before there were records counts its manifest's mtime.

What an image uses: its manifest and use record, its config and saved config, its
layers' blobs, their overlay dirs with their records (.diffid, .implicit, .whiteouts,
.link) and short links, and the chain copies and attributes lowerdir a mount of it
made (named from its layer dirs as tosi_tools.chain names them). `collect` removes
what no kept image uses, and with `max_size` first drops the least recently used
images (their manifests, use records and the tags and indexes that led only to
them) until the cache fits.

Never removed: what a running process holds, and what a live overlay mount has as a
lowerdir. Each blob, config and overlay dir is removed with its lock held (the lock
fetch and unpack take: Workdir.lock_path/lock_of, overlay_lock_path), taken without
waiting: a busy one is left, and said. An image a running `tosi` pulls is held by
its use record's shared lock (pipeline.pull) and is not dropped. The overlay dir is
worked on under the mount lock held exclusively (mounts hold it shared from choosing
their lowerdirs to mount(2)), and what the overlay mounts of /proc/self/mountinfo
name as lowerdirs (names relative to the overlay dir, or paths in it) is kept, with
the layer a short link leads to. The images are listed again just before removing,
so an image resolved meanwhile keeps what it uses.

Nothing is followed: trees are removed with saferoot.remove_tree_at from the
directory's own handle, and sizes are the blocks of each inode counted once
(hardlinks: a chain copy shares its files with its layer dir).
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from . import chain, overlayfs, saferoot
from .cache import Workdir
from .digest import Digest
from .errors import CacheError, ManifestError, UsageError, quoted
from .imageplatform import Platform
from .manifest import MAX_MANIFEST_SIZE, Index, config_platform, parse_config, parse_manifest
from .reference import parse_reference

log = logging.getLogger("tosi.gc")

# A temporary file nothing locks (atomic_write's .tmp-<name>-<random>) is a dead
# run's once it is this old: a live one exists for milliseconds.
STALE_TEMP_AGE = 3600.0

_DIGEST_NAME = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_HEX = re.compile(r"^([0-9a-f]{64}|[0-9a-f]{128})$")


class CachedImage(NamedTuple):
    """One image of the cache (see the module's docstring)."""

    registry: str
    repository: str
    digest: Digest  # of the image manifest
    reference: str  # as last resolved, else from a tag that leads to it, else by digest
    platform: str | None
    config: Digest | None
    layers: tuple[Digest, ...]  # bottom first
    last_used: float  # seconds since the epoch
    manifest_path: str
    record_path: str
    tags: tuple[str, ...]  # tags of its repository that lead to it (directly or by an index)
    indexes: tuple[Digest, ...]  # cached indexes that name it
    size: int = 0  # bytes on disk of what it uses (list_images(sizes=True))


class Removal(NamedTuple):
    """One path removed (or that would be, with dry_run)."""

    path: str
    what: str
    size: int  # bytes on disk under it


class Collection(NamedTuple):
    removed: list[Removal]
    busy: list[str]  # paths left because a running process holds them
    dropped: list[CachedImage]  # images removed to fit max_size
    freed: int  # bytes on disk freed (each inode once)
    size_before: int
    size_after: int


# ---------------------------------------------------------------- sizes


Usage = dict[tuple[int, int], int]  # (st_dev, st_ino) -> bytes on disk


def _add(usage: Usage, st: os.stat_result) -> None:
    usage[(st.st_dev, st.st_ino)] = st.st_blocks * 512


def usage_of(path: str, usage: Usage | None = None) -> Usage:
    """The inodes under `path` (itself if not a directory; nothing if missing) and
    their bytes on disk. Never follows a symlink; holds as few directory handles
    as saferoot.walk_tree whatever the depth."""
    usage = {} if usage is None else usage
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return usage
    _add(usage, st)
    if not stat.S_ISDIR(st.st_mode):
        return usage
    try:
        top = os.open(path, saferoot.DIR_FLAGS)
    except FileNotFoundError:
        return usage
    try:
        # The tree is found as it is walked: each directory's subdirectories become its
        # children when it is entered, and are forgotten once it is left.
        root = saferoot.Node(None)
        root.children = _scan_dir(top, usage)
        saferoot.walk_tree(top, root, lambda parent_fd, node: _enter(parent_fd, node, usage), _forget_children)
    finally:
        os.close(top)
    return usage


def _enter(parent_fd: int, node: saferoot.Node, usage: Usage) -> int | None:
    assert node.name is not None  # only the root has none, and it is not entered
    try:
        fd = os.open(node.name, saferoot.DIR_FLAGS, dir_fd=parent_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None  # gone, or replaced, since its parent was read
    try:
        node.children = _scan_dir(fd, usage)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _forget_children(fd: int, node: saferoot.Node) -> None:
    node.children = []


def _scan_dir(fd: int, usage: Usage) -> list[saferoot.Node]:
    """Add the entries of directory `fd` to `usage`; Nodes for its subdirectories."""
    subdirs = []
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            _add(usage, st)
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(saferoot.Node(entry.name))
    return subdirs


def _bytes(usage: Usage) -> int:
    return sum(usage.values())


def parse_max_size(text: str, flag: str = "--max-size") -> int:
    """SIZE as 10G, 500M, 4096 (powers of 1024); UsageError otherwise."""
    from .space import parse_size

    amount = parse_size(text, flag)
    if isinstance(amount, tuple):
        raise UsageError(f"{flag}: {quoted(text)} is not a size such as 10G or 500M")
    return amount


# ---------------------------------------------------------------- the images


class _Scan(NamedTuple):
    images: list[CachedImage]
    indexes: dict[str, tuple[str, list[Digest]]]  # index manifest path -> (repository dir, children)
    tags: dict[str, Digest]  # tag file -> digest
    registry_dirs: list[str]


def _read_small(path: str, limit: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(limit + 1)
    return data if len(data) <= limit else None


def _mtime(path: str) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return None


def _scan(workdir: Workdir) -> _Scan:
    """Every manifest, index and tag file under manifests/ (no symlink followed)."""
    found: list[tuple[str, str, str, Digest]] = []  # (registry, repository, path, digest)
    tags: dict[str, Digest] = {}
    registry_dirs: list[str] = []
    stack: list[tuple[str, tuple[str, ...]]] = [(workdir.manifests, ())]
    while stack:
        directory, parts = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        if len(parts) == 1:
            registry_dirs.append(directory)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, parts + (entry.name,)))
            elif not entry.is_file(follow_symlinks=False) or not parts:
                continue
            elif _DIGEST_NAME.match(entry.name) and len(parts) >= 2:
                found.append((parts[0], "/".join(parts[1:]), entry.path, Digest(entry.name)))
            elif len(parts) >= 3 and parts[-1] == "tags":
                text = (_read_small(entry.path, 200) or b"").decode(errors="replace").strip()
                if _DIGEST_NAME.match(text):
                    tags[entry.path] = Digest(text)
    manifests = {}
    indexes: dict[str, tuple[str, list[Digest]]] = {}
    for registry, repository, path, digest in found:
        data = _read_small(path, MAX_MANIFEST_SIZE)
        if data is None:
            continue
        try:
            parsed = parse_manifest(data, what=f"cached manifest {path}")
        except (ManifestError, UsageError, ValueError):
            log.info("%s is not a manifest tosi reads: left alone", path)
            continue
        if isinstance(parsed, Index):
            children = []
            for descriptor in parsed.manifests:
                with contextlib.suppress(UsageError):
                    children.append(Digest(descriptor["digest"]))
            indexes[path] = (os.path.dirname(path), children)
        else:
            manifests[path] = (registry, repository, digest, parsed)
    images = []
    for path, (registry, repository, digest, parsed) in manifests.items():
        repo_dir = os.path.dirname(path)
        led_by = {digest} | {Digest(os.path.basename(p)) for p, (d, children) in indexes.items()
                             if d == repo_dir and digest in children}
        image_tags = sorted(os.path.basename(t) for t, d in tags.items()
                            if os.path.dirname(os.path.dirname(t)) == repo_dir and d in led_by)
        images.append(_image(workdir, registry, repository, digest, parsed, path, tuple(image_tags),
                             tuple(sorted(led_by - {digest}))))
    images.sort(key=lambda image: image.last_used, reverse=True)
    return _Scan(images, indexes, tags, registry_dirs)


def _image(workdir: Workdir, registry: str, repository: str, digest: Digest, parsed, path: str,
           tags: tuple[str, ...], indexes: tuple[Digest, ...]) -> CachedImage:
    record_path = path + Workdir.USED_SUFFIX
    record = {}
    data = _read_small(record_path, 64 * 1024)
    if data is not None:
        with contextlib.suppress(ValueError):
            loaded = json.loads(data)
            record = loaded if isinstance(loaded, dict) else {}
    config = None
    with contextlib.suppress(KeyError, TypeError, UsageError):
        config = Digest(parsed.config["digest"])
    layers = []
    for descriptor in parsed.layers:
        with contextlib.suppress(KeyError, TypeError, UsageError):
            layers.append(Digest(descriptor["digest"]))
    platform = Platform.from_dict(record.get("platform"))
    if platform is None and config is not None:
        config_data = _read_small(workdir.config_path(config), 16 << 20)
        with contextlib.suppress(ManifestError, UsageError, ValueError):
            platform = config_platform(parse_config(config_data)) if config_data else None
    reference = record.get("reference")
    if not isinstance(reference, str):
        reference = f"{registry}/{repository}:{tags[0]}" if tags else f"{registry}/{repository}@{digest}"
    last_used = _mtime(record_path) or _mtime(path) or 0.0
    return CachedImage(registry, repository, digest, reference, str(platform) if platform else None,
                       config, tuple(layers), last_used, path, record_path, tags, indexes)


def list_images(workdir: Workdir, sizes: bool = True) -> list[CachedImage]:
    """The images of the workdir, the most recently used first; with `sizes`, each with
    the bytes on disk of what it uses (shared layers counted in each image using them)."""
    workdir.check()
    images = _scan(workdir).images
    if not sizes:
        return images
    return [image._replace(size=_bytes(_usage_of_paths(_paths_of(workdir, image))))
            for image in images]


# ---------------------------------------------------------------- what an image uses
#
# Units: ("blob", hex), ("config", digest), ("overlay", hex), ("chain", name),
# ("attrs", name), ("image", manifest path). Each has paths (usage) and a lock.


def _lowers(workdir: Workdir, image: CachedImage) -> tuple[list[str], list[str]]:
    """(names in the overlay dir a mount of `image` would use, topmost first: chain copies
    where they exist; [the attributes lowerdir's name] if it exists)."""
    names = list(dict.fromkeys(d.hex for d in reversed(image.layers)))
    ovdir = workdir.overlays
    dirs = [os.path.realpath(os.path.join(ovdir, name)) for name in names]
    if not names or not all(os.path.isdir(d) for d in dirs):
        return names, []
    try:
        ids = chain.chain_ids(dirs)
    except (OSError, UsageError, CacheError):
        ids = []
    effective = list(names)
    for index, chain_id in enumerate(ids[:-1]):
        name = chain.CHAIN_PREFIX + chain_id
        if os.path.isdir(os.path.join(ovdir, name)) and not os.path.islink(os.path.join(ovdir, name)):
            effective[index] = name
    real = [os.path.realpath(os.path.join(ovdir, name)) for name in effective]
    attributes = workdir.attributes_lower_name(chain.attributes_key(real))
    chains = [name for name in effective if name.startswith(chain.CHAIN_PREFIX)]
    return effective, chains + ([attributes] if os.path.isdir(os.path.join(ovdir, attributes)) else [])


def _units_of(workdir: Workdir, image: CachedImage) -> set[tuple[str, str]]:
    units = {("image", image.manifest_path)}
    if image.config is not None:
        units.add(("config", str(image.config)))
    for digest in image.layers:
        units.add(("blob", digest.hex))
        units.add(("overlay", digest.hex))
    for name in _lowers(workdir, image)[1]:
        units.add(("chain" if name.startswith(chain.CHAIN_PREFIX) else "attrs", name))
    return units


def _unit_paths(workdir: Workdir, unit: tuple[str, str]) -> list[str]:
    kind, name = unit
    if kind == "blob":
        blob = os.path.join(workdir.layers, name)
        return [blob, Workdir.partial_of(blob)]
    if kind == "config":
        blob = workdir.config_path(name)
        return [blob, workdir.saved_config_path(name), Workdir.partial_of(blob)]
    if kind == "overlay":
        layer_dir = os.path.join(workdir.overlays, name)
        return [layer_dir] + [layer_dir + suffix for suffix in _LAYER_RECORDS]
    if kind in ("chain", "attrs"):
        path = os.path.join(workdir.overlays, name)
        return [path, Workdir.implicit_of(path), Workdir.whiteouts_of(path)]
    if kind == "image":
        return [name, name + Workdir.USED_SUFFIX]
    raise AssertionError(kind)


def _unit_lock(workdir: Workdir, unit: tuple[str, str]) -> str | None:
    kind, name = unit
    if kind == "blob":
        return Workdir.lock_of(os.path.join(workdir.layers, name))
    if kind == "config":
        return Workdir.lock_of(workdir.config_path(name))
    if kind == "overlay":
        return os.path.join(workdir.overlays, name + ".lock")
    if kind == "image":
        return name + Workdir.USED_SUFFIX  # pipeline.pull holds it shared
    return None  # chain copies and attributes lowerdirs: the mount lock


_LAYER_RECORDS = (".diffid", Workdir.IMPLICIT_SUFFIX, Workdir.WHITEOUTS_SUFFIX, ".link")


def _paths_of(workdir: Workdir, image: CachedImage) -> list[str]:
    return [path for unit in _units_of(workdir, image) for path in _unit_paths(workdir, unit)]


def _usage_of_paths(paths: Iterable[str]) -> Usage:
    usage: Usage = {}
    for path in paths:
        usage_of(path, usage)
    return usage


# ---------------------------------------------------------------- locks and mounts


@contextlib.contextmanager
def _try_lock(path: str | None, create: bool) -> Iterator[bool]:
    """Hold an exclusive lock on `path` if nobody holds one (True), without waiting;
    a missing file is free (made when `create`, to hold it)."""
    if path is None:
        yield True
        return
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def live_lowers(workdir: Workdir, mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    """The names in the overlay dir that live overlay mounts use as lowerdirs (with the
    layer dir each short link leads to). A relative lowerdir is taken as a name in this
    overlay dir whichever directory it was relative to: kept, at worst, for nothing."""
    ovdir = workdir.overlays
    real = os.path.realpath(ovdir)
    names = set()
    for lowers in overlayfs.mounted_lowerdirs(mountinfo):
        for lower in lowers:
            if os.path.isabs(lower):
                parent, name = os.path.split(os.path.normpath(lower))
                if parent not in (ovdir, real):
                    continue
            else:
                name = os.path.normpath(lower).split("/")[0]
            names.add(name)
            with contextlib.suppress(OSError):
                names.add(os.readlink(os.path.join(ovdir, name)))
    return names


# ---------------------------------------------------------------- collecting


def _matching(images: Sequence[CachedImage], text: str) -> list[CachedImage]:
    ref = parse_reference(text)
    found = []
    for image in images:
        if (image.registry, image.repository) != (ref.registry, ref.repository):
            continue
        if ref.digest is not None:
            if ref.digest == image.digest or ref.digest in image.indexes:
                found.append(image)
        elif ref.tag in image.tags or image.reference == ref.normalized():
            found.append(image)
    return found


def _units_by_image(workdir: Workdir, images: Sequence[CachedImage]) -> dict[str, set[tuple[str, str]]]:
    return {image.manifest_path: _units_of(workdir, image) for image in images}


def collect(workdir: Workdir, keep: Sequence[str] = (), max_size: int | None = None,
            dry_run: bool = False, mountinfo: str = "/proc/self/mountinfo",
            now: float | None = None) -> Collection:
    """Remove what no kept image uses (see the module's docstring); with `max_size`
    (bytes), first drop the least recently used images until the cache fits, except
    those `keep` names (references; one no cached image matches is a UsageError),
    those a running pull holds and those a live mount shows. `dry_run`: remove
    nothing, say what would go."""
    workdir.check()
    now = time.time() if now is None else now
    first = _scan(workdir)
    kept: set[str] = set()
    for text in keep:
        matched = _matching(first.images, text)
        if not matched:
            raise UsageError(f"--keep {quoted(text)}: no cached image has that reference "
                             "(tosi-gc --list shows them)")
        kept.update(image.manifest_path for image in matched)
    lock_path = workdir.mount_lock_path()
    with contextlib.ExitStack() as stack:
        if not dry_run and os.path.isdir(workdir.overlays):
            # Waits for mounts choosing their lowerdirs: afterwards, /proc/self/mountinfo
            # shows each of them, and the next ones see what is left.
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        live = live_lowers(workdir, mountinfo)
        return _collect(workdir, first, kept, live, max_size, dry_run, now)


def _collect(workdir: Workdir, first: _Scan, kept: set[str], live: set[str], max_size: int | None,
             dry_run: bool, now: float) -> Collection:
    total = _usage_of_paths(_tops(workdir))
    size_before = _bytes(total)
    units = _units_by_image(workdir, first.images)
    for image in first.images:
        held = not _free(_unit_lock(workdir, ("image", image.manifest_path)))
        lowers = _lowers(workdir, image)[0]
        mounted = bool(lowers) and set(lowers) <= live
        if held or mounted:
            kept.add(image.manifest_path)
    dropped: list[CachedImage] = []
    if max_size is not None:
        dropped = _to_drop(workdir, first.images, units, kept, live, total, max_size)
    # Listed again: an image resolved (or used) meanwhile keeps what it uses.
    dropped_at = {image.manifest_path: image.last_used for image in dropped}
    again = _scan(workdir)
    remaining = [image for image in again.images if image.manifest_path not in dropped_at
                 or image.last_used > dropped_at[image.manifest_path]]
    needed = set().union(*_units_by_image(workdir, remaining).values()) if remaining else set()
    plan = _removals(workdir, again, remaining, needed, live, now)
    removed: list[Removal] = []
    busy: list[str] = []
    removed_usage: Usage = {}
    for unit, paths, whole in plan:
        lock = _unit_lock(workdir, unit) if unit is not None else None
        with _try_lock(lock, create=not dry_run) as free:
            existing = _existing(paths)
            if not free:
                busy.extend(path for path, _ in existing)
                for path, _ in existing:
                    log.info("%s: in use, left", path)
                continue
            if whole and lock is not None and unit is not None and unit[0] != "image" \
                    and os.path.lexists(lock):
                existing.append((lock, "lock"))  # stale once what it guarded is gone
            for path, what in existing:
                usage = usage_of(path)
                for key, size in usage.items():
                    # An inode freed earlier in this run may come back as a (0-byte) lock file.
                    removed_usage[key] = max(removed_usage.get(key, 0), size)
                removed.append(Removal(path, what, _bytes(usage)))
                if not dry_run:
                    _remove(path)
                    log.info("removed %s %s", what, path)
    # The repository and registry directories left empty (a registry's .scheme and
    # .challenged alone go too: nothing is cached from it).
    gone = {removal.path for removal in removed}
    for path in _emptied(again.registry_dirs, gone):
        usage = usage_of(path) if not os.path.isdir(path) else {_key(path): _lstat_bytes(path)}
        removed_usage.update(usage)
        removed.append(Removal(path, "directory" if os.path.isdir(path) else "registry record",
                               _bytes(usage)))
        if not dry_run:
            with contextlib.suppress(OSError):  # something written there meanwhile stays
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)
    # A removed chain copy's files are its layer dir's too (hardlinks): freed only if no
    # kept path has them.
    kept_usage = _usage_of_paths(path for unit in needed for path in _unit_paths(workdir, unit))
    freed = sum(size for key, size in removed_usage.items() if key not in kept_usage)
    remaining_paths = {image.manifest_path for image in remaining}
    return Collection(removed, busy, [image for image in dropped if image.manifest_path not in remaining_paths],
                      freed, size_before, size_before - freed)


def _tops(workdir: Workdir) -> list[str]:
    inside = os.path.dirname(workdir.overlays) == workdir.root
    return [workdir.root] if inside else [workdir.root, workdir.overlays]


def _free(lock: str | None) -> bool:
    with _try_lock(lock, create=False) as free:
        return free


def _to_drop(workdir: Workdir, images: Sequence[CachedImage], units: dict[str, set[tuple[str, str]]],
             kept: set[str], live: set[str], total: Usage, max_size: int) -> list[CachedImage]:
    """The least recently used images to remove (not kept) until what the others use,
    and what is not any image's, fits in `max_size`; each inode counted once."""
    unit_usage: dict[tuple[str, str], Usage] = {}
    users: dict[tuple[str, str], set[str]] = {}
    for path, image_units in units.items():
        for unit in image_units:
            if unit not in unit_usage:
                unit_usage[unit] = _usage_of_paths(_unit_paths(workdir, unit))
            users.setdefault(unit, set()).add(path)
    in_units: set[tuple[int, int]] = set().union(*unit_usage.values()) if unit_usage else set()
    # What is no image's counts as it is (it goes anyway, unless a mount holds it).
    counts: dict[tuple[int, int], int] = {key: 1 for key in total if key not in in_units}
    for usage in unit_usage.values():
        for key in usage:
            counts[key] = counts.get(key, 0) + 1
    size = sum(total.get(key, 0) for key in counts)
    dropped = []
    for image in sorted(images, key=lambda image: image.last_used):
        if size <= max_size:
            break
        if image.manifest_path in kept:
            continue
        dropped.append(image)
        for unit in units[image.manifest_path]:
            users[unit].discard(image.manifest_path)
            if users[unit] or unit[0] in ("overlay", "chain", "attrs") and unit[1] in live:
                continue
            for key in unit_usage[unit]:
                counts[key] -= 1
                if counts[key] == 0:
                    size -= total.get(key, 0)
    return dropped


def _existing(paths: Sequence[str]) -> list[tuple[str, str]]:
    found = []
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        found.append((path, _what(path, st)))
    return found


def _what(path: str, st: os.stat_result) -> str:
    """What a path of the cache is, for the lines saying what goes."""
    name = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(path))
    is_dir = stat.S_ISDIR(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return "short link"
    if name.endswith(".lock"):
        return "lock"
    if name.endswith(".partial"):
        return "partial blob"
    if name.startswith(Workdir.TEMP_PREFIX) or re.search(r"\.[0-9a-f]{8}$", name) \
            and name.startswith((chain.CHAIN_PREFIX, Workdir.ATTRIBUTES_PREFIX)):
        return "temporary"
    if name.endswith(Workdir.USED_SUFFIX):
        return "use record"
    if name.startswith(chain.CHAIN_PREFIX):
        return "chain copy" if is_dir else "layer record"
    if name.startswith(Workdir.ATTRIBUTES_PREFIX):
        return "attributes lowerdir"
    if name == Workdir.EMPTY_LOWER:
        return "empty lowerdir"
    if parent == "layers":
        return "blob"
    if parent == "configs":
        return "saved config" if name.startswith("v2:") else "config"
    if parent == "tags":
        return "tag"
    if _HEX.match(name.split(".", 1)[0]) and not _DIGEST_NAME.match(name):
        return "overlay dir" if is_dir else "layer record"
    return "manifest"


def _remove(path: str) -> None:
    """Remove `path` (a tree too) from its parent's handle; a symlink goes, not its target."""
    saferoot.remove_tree(path)


_Plan = list[tuple[tuple[str, str] | None, list[str], bool]]


def _removals(workdir: Workdir, scan: _Scan, remaining: Sequence[CachedImage],
              needed: set[tuple[str, str]], live: set[str], now: float) -> _Plan:
    """[(unit or None, paths, whole)] of what goes, each under its unit's lock; `whole`:
    all of the unit goes (its lock file then too)."""
    plan: _Plan = []
    remaining_paths = {image.manifest_path for image in remaining}
    images = {image.manifest_path for image in scan.images}
    # images dropped, and the tags and indexes that led only to them
    for image in scan.images:
        if image.manifest_path not in remaining_paths:
            unit = ("image", image.manifest_path)
            plan.append((unit, _unit_paths(workdir, unit), True))
    dead_indexes = set()
    for path, (repo_dir, children) in scan.indexes.items():
        named = [os.path.join(repo_dir, str(child)) for child in children]
        named = [child for child in named if child in images]
        if named and not any(child in remaining_paths for child in named):
            dead_indexes.add(path)
            plan.append((None, [path], True))
    for tag, digest in scan.tags.items():
        target = os.path.join(os.path.dirname(os.path.dirname(tag)), str(digest))
        if target in dead_indexes or (target in images and target not in remaining_paths):
            plan.append((None, [tag], True))
    planned = set()
    for name in _names(workdir.layers):
        base = name.split(".", 1)[0]
        unit = ("blob", base)
        if _HEX.match(base) and unit not in needed and unit not in planned:
            planned.add(unit)
            plan.append((unit, _unit_paths(workdir, unit), True))
        elif not _HEX.match(base):
            _stale_temp(os.path.join(workdir.layers, name), now, plan)
    for name in _names(workdir.configs):
        base = name[3:] if name.startswith("v2:") else name
        base = base.rsplit(".", 1)[0] if base.endswith((".partial", ".lock")) else base
        unit = ("config", base)
        if _DIGEST_NAME.match(base) and unit not in needed and unit not in planned:
            planned.add(unit)
            plan.append((unit, _unit_paths(workdir, unit), True))
        elif not _DIGEST_NAME.match(base):
            _stale_temp(os.path.join(workdir.configs, name), now, plan)
    _overlay_removals(workdir, needed, live, now, plan)
    return plan


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _stale_temp(path: str, now: float, plan: _Plan) -> None:
    """atomic_write's temporary files nothing locks: a dead run's once old."""
    if os.path.basename(path).startswith(Workdir.TEMP_PREFIX):
        mtime = _mtime(path)
        if mtime is not None and now - mtime > STALE_TEMP_AGE:
            plan.append((None, [path], True))


def _overlay_removals(workdir: Workdir, needed: set[tuple[str, str]], live: set[str], now: float,
                      plan: _Plan) -> None:
    ovdir = workdir.overlays
    names = _names(ovdir)
    keep_hex = {name for kind, name in needed if kind == "overlay"} | live
    going = set()
    for name in names:
        path = os.path.join(ovdir, name)
        base = name.split(".", 1)[0]
        if _HEX.match(base):
            if base not in keep_hex and base not in going:
                going.add(base)
                plan.append((("overlay", base), _unit_paths(workdir, ("overlay", base)), True))
        elif name.startswith(Workdir.TEMP_PREFIX):
            hexname, dash, _ = name[len(Workdir.TEMP_PREFIX):].partition("-")
            if dash and _HEX.match(hexname):
                # an extraction in progress holds its layer's lock
                plan.append((("overlay", hexname), [path], hexname not in keep_hex))
            else:
                _stale_temp(path, now, plan)
        elif name.startswith((chain.CHAIN_PREFIX, Workdir.ATTRIBUTES_PREFIX)):
            # The mount lock is held: a <name>.<random> temporary is a dead mount's.
            kind = "chain" if name.startswith(chain.CHAIN_PREFIX) else "attrs"
            own = name
            for suffix in (Workdir.IMPLICIT_SUFFIX, Workdir.WHITEOUTS_SUFFIX):
                own = own.removesuffix(suffix)
            if (kind, own) not in needed and own not in live:
                plan.append((None, [path], True))
        elif name == Workdir.EMPTY_LOWER:
            if name not in live:
                plan.append((None, [path], True))
        elif name not in live and os.path.islink(path):
            with contextlib.suppress(OSError):
                target = os.readlink(path)
                if target not in keep_hex or not os.path.isdir(os.path.join(ovdir, target)):
                    plan.append((None, [path], True))
    # A layer's short links go with it, under its lock.
    links: dict[str, list[str]] = {}
    for name in names:
        path = os.path.join(ovdir, name)
        if name not in live and os.path.islink(path):
            with contextlib.suppress(OSError):
                links.setdefault(os.readlink(path), []).append(path)
    planned = {path for _unit, paths, _whole in plan for path in paths}  # each path once
    for unit, paths, whole in plan:
        if whole and unit is not None and unit[0] == "overlay":
            extra = [path for path in links.get(unit[1], ()) if path not in planned]
            paths.extend(extra)
            planned.update(extra)


def _key(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def _lstat_bytes(path: str) -> int:
    return os.lstat(path).st_blocks * 512


_REGISTRY_RECORDS = {".scheme", ".challenged"}


def _emptied(registry_dirs: Sequence[str], gone: set[str]) -> list[str]:
    """The paths to remove once `gone` is: each directory below a registry directory
    that holds nothing else (deepest first), and a registry directory left with its
    .scheme and .challenged only, with them. Nothing is followed."""
    result: list[str] = []
    for top in registry_dirs:
        order = []  # directories, parents before children
        stack = [top]
        while stack:
            directory = stack.pop()
            order.append(directory)
            for name in _names(directory):
                path = os.path.join(directory, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    stack.append(path)
        empty: set[str] = set()
        for directory in reversed(order):
            left = [name for name in _names(directory)
                    if os.path.join(directory, name) not in gone | empty]
            if directory == top:
                if set(left) <= _REGISTRY_RECORDS:
                    result.extend(os.path.join(top, name) for name in sorted(left))
                    result.extend(sorted(empty, key=len, reverse=True))
                    result.append(top)
                else:
                    result.extend(sorted(empty, key=len, reverse=True))
            elif not left:
                empty.add(directory)
    return result
