"""The benchmark images: layer blobs written to files, described by an image.json beside them.

Full-size images are generated once into bench/.cache/images/<key>/ and reused;
a directory without image.json is a generation that did not finish and is redone.
Layers are tar streams compressed with gzip, pushed as Docker v2 gzip layers.

  debian_rootfs     debootstrap --variant=minbase, a layer of packages, a layer of deletions
  synthetic_rootfs  a small made-up root filesystem with the same three kinds of layer (--quick)
  small_files       N small files of compressible text spread over K layers
  incompressible    N bytes of random data spread over K layers
"""

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import stat
import subprocess
import tarfile
from dataclasses import asdict, dataclass, field

from tests.support import images as img

from . import CACHE
from .report import log
from .scratch import remove_tree, unmount_under

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the "packages" layer adds on top of minbase: a few hundred MB in all, as asked.
DEBIAN_PACKAGES = ["python3", "perl", "git", "curl", "ca-certificates", "openssl", "procps",
                   "less", "vim-tiny", "xz-utils", "gnupg", "iproute2"]
GZIP_LEVEL = 6  # what docker and most builders use


@dataclass
class LayerBlob:
    path: str
    digest: str
    diff_id: str
    size: int
    media_type: str = img.DOCKER_LAYER_GZIP


@dataclass
class BuiltImage:
    name: str
    description: str
    layers: list
    entries: int = 0          # tar entries over all layers
    unpacked_bytes: int = 0   # regular-file bytes over all layers
    extra: dict = field(default_factory=dict)

    @property
    def blob_bytes(self):
        return sum(layer.size for layer in self.layers)

    def summary(self):
        return {"description": self.description, "layers": len(self.layers),
                "entries": self.entries, "unpackedBytes": self.unpacked_bytes,
                "blobBytes": self.blob_bytes, **self.extra}

    def save(self, directory):
        body = asdict(self)
        for layer in body["layers"]:
            layer["path"] = os.path.basename(layer["path"])
        with open(os.path.join(directory, "image.json"), "w") as f:
            json.dump(body, f, indent=1)

    @classmethod
    def load(cls, directory):
        with open(os.path.join(directory, "image.json")) as f:
            body = json.load(f)
        body["layers"] = [LayerBlob(**{**layer, "path": os.path.join(directory, layer["path"])})
                          for layer in body["layers"]]
        return cls(**body)


def push(pusher, repo, tag, image):
    """Push a built image through the registry's HTTP API; returns the reference's path part."""
    layers = []
    for blob in image.layers:
        with open(blob.path, "rb") as f:
            layers.append(img.Layer(data=f.read(), media_type=blob.media_type, diff_id=blob.diff_id))
    pusher.push_image(repo, tag, layers)
    return f"{repo}:{tag}"


# ---------------------------------------------------------------- writing layers

class _Hashing(io.RawIOBase):
    """A write-only stream that hashes (the diffID) and counts what passes through it."""

    def __init__(self, sink):
        self.sink = sink
        self.sha = hashlib.sha256()
        self.position = 0

    def writable(self):
        return True

    def tell(self):
        return self.position

    def write(self, data):
        self.sha.update(data)
        self.sink.write(data)
        self.position += len(data)
        return len(data)


class LayerWriter:
    """Writes one gzip layer blob to `path`: a tarfile to add entries to, or raw tar bytes."""

    def __init__(self, path):
        self.path = path
        self.entries = 0
        self.file_bytes = 0
        self._raw = open(path + ".tmp", "wb")
        self._gzip = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0)
        self._hashing = _Hashing(self._gzip)
        self.tar = None

    def add(self, info, data=None):
        """Add a (TarInfo, bytes-or-None) pair as made by tests/support/images.py."""
        if self.tar is None:
            self.tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)
        self.tar.addfile(info, io.BytesIO(data) if data is not None else None)
        self.entries += 1
        self.file_bytes += len(data or b"")

    def add_stream(self, info, stream):
        if self.tar is None:
            self.tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)
        self.tar.addfile(info, stream)
        self.entries += 1
        self.file_bytes += info.size

    def copy_tar(self, stream):
        """Raw tar bytes (GNU tar's output) instead of tarfile entries."""
        while chunk := stream.read(1 << 20):
            self._hashing.write(chunk)

    def close(self):
        if self.tar is not None:
            self.tar.close()
        self._gzip.close()
        self._raw.close()
        os.replace(self.path + ".tmp", self.path)
        with open(self.path, "rb") as f:
            digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        return LayerBlob(path=self.path, digest=digest, diff_id="sha256:" + self._hashing.sha.hexdigest(),
                         size=os.path.getsize(self.path))


@contextlib.contextmanager
def _generating(directory):
    """Yield `directory` emptied; remove it again if generation fails half way."""
    remove_tree(directory)
    os.makedirs(directory)
    try:
        yield directory
    except BaseException:
        remove_tree(directory)
        raise


def cached(key, make, cache_dir=None):
    """The image in <cache>/images/<key>, made by make(directory) when not there yet."""
    directory = os.path.join(cache_dir or CACHE, "images", key)
    if os.path.exists(os.path.join(directory, "image.json")):
        return BuiltImage.load(directory)
    log(f"generating image {key}")
    with _generating(directory):
        image = make(directory)
        image.save(directory)
    return image


# ---------------------------------------------------------------- small files

_TEXT = None


def _text_pool():
    # Compressible like source code or config files (about 3:1), yet not all alike.
    global _TEXT
    if _TEXT is None:
        rng = random.Random(6)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 9)))
                 for _ in range(800)]
        _TEXT = " ".join(rng.choice(words) for _ in range(40000)).encode()
    return _TEXT


def small_files(directory, count, layers, per_dir=100):
    """`count` files of 64-4095 bytes, `per_dir` to a directory, split evenly over `layers`."""
    pool = _text_pool()
    rng = random.Random(count)
    blobs, entries, total = [], 0, 0
    per_layer = -(-count // layers)
    for index in range(layers):
        writer = LayerWriter(os.path.join(directory, f"layer-{index}.tar.gz"))
        for n in range(index * per_layer, min(count, (index + 1) * per_layer)):
            if n % per_dir == 0 or n == index * per_layer:
                writer.add(*img.dir_entry(f"d{n // per_dir:05d}"))
            size = rng.randint(64, 4095)
            start = rng.randrange(len(pool) - size)
            writer.add(*img.file_entry(f"d{n // per_dir:05d}/f{n:06d}.txt", pool[start:start + size]))
        entries += writer.entries
        total += writer.file_bytes
        blobs.append(writer.close())
    return BuiltImage(name="", description=f"{count:,} small files in {layers} layer(s)",
                      layers=blobs, entries=entries, unpacked_bytes=total)


# ---------------------------------------------------------------- incompressible

class _RandomStream:
    def __init__(self, size, rng):
        self.left = size
        self.rng = rng

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


def incompressible(directory, total, layers, files_per_layer=8):
    """`total` bytes of random data in `layers` layers of `files_per_layer` files each."""
    rng = random.Random(total)
    file_size = total // (layers * files_per_layer)
    blobs, entries = [], 0
    for index in range(layers):
        writer = LayerWriter(os.path.join(directory, f"layer-{index}.tar.gz"))
        writer.add(*img.dir_entry(f"data{index}"))
        for n in range(files_per_layer):
            info, _ = img.file_entry(f"data{index}/blob{n:02d}.bin")
            info.size = file_size
            writer.add_stream(info, _RandomStream(file_size, rng))
        entries += writer.entries
        blobs.append(writer.close())
    return BuiltImage(name="", description=f"{total / 2**20:,.0f} MiB of random data in {layers} layers",
                      layers=blobs, entries=entries, unpacked_bytes=file_size * files_per_layer * layers)


# ---------------------------------------------------------------- root filesystems

def _deletions_layer(writer, paths_deleted, dirs_emptied, changed_files):
    """The third layer of a root filesystem: whiteouts, opaque directories, a few edits."""
    for path in paths_deleted:
        writer.add(*img.whiteout_entry(path))
    for path in dirs_emptied:
        writer.add(*img.dir_entry(path))
        writer.add(*img.opaque_entry(path))
    for path, data in changed_files.items():
        writer.add(*img.file_entry(path, data))
    return writer.close()


def synthetic_rootfs(directory):
    """A small root filesystem (quick mode): every entry type, then packages, then deletions."""
    base = LayerWriter(os.path.join(directory, "layer-0.tar.gz"))
    for d in ("bin", "etc", "usr", "usr/bin", "usr/lib", "usr/share", "usr/share/doc",
              "usr/share/man", "usr/share/man/man1", "var", "var/cache", "dev", "tmp"):
        base.add(*img.dir_entry(d, mode=0o1777 if d == "tmp" else 0o755))
    pool = _text_pool()
    for n in range(150):
        base.add(*img.file_entry(f"usr/bin/tool{n:03d}", pool[n * 97:n * 97 + 3000], mode=0o755))
        base.add(*img.file_entry(f"usr/share/man/man1/tool{n:03d}.1", pool[n * 31:n * 31 + 800]))
    for n in range(20):
        base.add(*img.dir_entry(f"usr/share/doc/pkg{n:02d}"))
        base.add(*img.file_entry(f"usr/share/doc/pkg{n:02d}/copyright", pool[n:n + 1500]))
    base.add(*img.file_entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
    base.add(*img.file_entry("etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42))
    base.add(*img.symlink_entry("bin/sh", "/usr/bin/tool000"))
    base.add(*img.hardlink_entry("usr/bin/tool-alias", "usr/bin/tool001"))
    base.add(*img.special_entry("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666))
    base.add(*img.special_entry("dev/initctl", tarfile.FIFOTYPE, mode=0o600))
    layer0 = base.close()

    packages = LayerWriter(os.path.join(directory, "layer-1.tar.gz"))
    packages.add(*img.dir_entry("usr/lib/python3"))
    for n in range(300):
        packages.add(*img.file_entry(f"usr/lib/python3/mod{n:03d}.py", pool[n * 53:n * 53 + 2000]))
    packages.add(*img.file_entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"))
    layer1 = packages.close()

    deletions = LayerWriter(os.path.join(directory, "layer-2.tar.gz"))
    layer2 = _deletions_layer(
        deletions,
        paths_deleted=[f"usr/share/doc/pkg{n:02d}" for n in range(20)] + ["usr/bin/tool149"],
        dirs_emptied=["usr/share/man", "var/cache"],
        changed_files={"etc/motd": b"benchmark image\n"},
    )
    return BuiltImage(name="", description="synthetic root filesystem, 3 layers (quick mode)",
                      layers=[layer0, layer1, layer2],
                      entries=base.entries + packages.entries + deletions.entries,
                      unpacked_bytes=base.file_bytes + packages.file_bytes)


def _debootstrap(target, cache_dir, include=()):
    """A minbase tree at `target`, made once; the .deb files are kept for the next one."""
    if os.path.exists(os.path.join(target, ".bench-complete")):
        return target
    partial = target + ".partial"
    remove_tree(partial)
    debs = os.path.join(cache_dir, "debs")
    os.makedirs(debs, exist_ok=True)
    argv = ["debootstrap", "--variant=minbase", f"--cache-dir={debs}"]
    if include:
        argv.append("--include=" + ",".join(include))
    argv += [DEBIAN_SUITE, partial, DEBIAN_MIRROR]
    log(f"running {' '.join(argv)}")
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    unmount_under(partial)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed: {proc.stderr.strip()[-2000:]}")
    # apt's downloaded lists and debs are not part of any real image
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for name in os.listdir(os.path.join(partial, junk)):
            path = os.path.join(partial, junk, name)
            if os.path.isfile(path) and name not in ("lock",):
                os.unlink(path)
    open(os.path.join(partial, ".bench-complete"), "w").close()
    os.replace(partial, target)
    return target


def _tree_state(root):
    """path -> what must match for the path to count as unchanged between two trees."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            key = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid, st.st_size)
            if stat.S_ISLNK(st.st_mode):
                key += (os.readlink(path),)
            elif stat.S_ISREG(st.st_mode):
                key += (st.st_mtime_ns,)
            state[rel] = key
    state.pop(".bench-complete", None)
    return state


def _same_content(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return hashlib.file_digest(fa, "sha256").digest() == hashlib.file_digest(fb, "sha256").digest()


def _gnu_tar_layer(path, root, members):
    """A layer of `members` (relative paths, parents first) of `root`, written by GNU tar."""
    writer = LayerWriter(path)
    listing = path + ".list"
    with open(listing, "wb") as f:
        f.write(b"\0".join(m.encode() for m in members) + b"\0")
    tar = subprocess.Popen(
        ["tar", "-C", root, "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
         "--no-recursion", "--null", "-T", listing, "-cf", "-"],
        stdout=subprocess.PIPE)
    writer.copy_tar(tar.stdout)
    if tar.wait() != 0:
        raise RuntimeError(f"tar failed making {path}")
    os.unlink(listing)
    return writer.close()


def _walk_members(root):
    members = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            members.append(os.path.relpath(os.path.join(dirpath, name), root))
    return [m for m in members if m != ".bench-complete"]


def _count(root, members):
    total = 0
    for m in members:
        st = os.lstat(os.path.join(root, m))
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def debian_rootfs(directory, cache_dir=None):
    """debootstrap minbase, then the packages of DEBIAN_PACKAGES, then a layer of deletions."""
    trees = os.path.join(cache_dir or CACHE, "debootstrap")
    base = _debootstrap(os.path.join(trees, "minbase"), trees)
    full = _debootstrap(os.path.join(trees, "packages"), trees, include=DEBIAN_PACKAGES)

    base_members = _walk_members(base)
    layer0 = _gnu_tar_layer(os.path.join(directory, "layer-0.tar.gz"), base, base_members)

    before, after = _tree_state(base), _tree_state(full)
    changed = []
    for rel in _walk_members(full):
        old = before.get(rel)
        if old is None:
            changed.append(rel)
        elif old != after[rel]:
            same_file = (old[:5] == after[rel][:5] and stat.S_ISREG(old[0])
                         and _same_content(os.path.join(base, rel), os.path.join(full, rel)))
            if not same_file:
                changed.append(rel)
    # Parents of changed entries go in too, as image builders write them.
    wanted = set(changed)
    for rel in changed:
        parent = os.path.dirname(rel)
        while parent and parent not in wanted:
            wanted.add(parent)
            parent = os.path.dirname(parent)
    layer1_members = [m for m in _walk_members(full) if m in wanted]
    layer1 = _gnu_tar_layer(os.path.join(directory, "layer-1.tar.gz"), full, layer1_members)

    # What installing the packages removed (rare) is whited out with the clean-up.
    removed = sorted(rel for rel in before if rel not in after and os.path.dirname(rel) in after)
    docs = sorted(os.listdir(os.path.join(full, "usr/share/doc")))
    locales = [d for d in sorted(os.listdir(os.path.join(full, "usr/share/locale")))
               if not d.startswith(("en", "locale"))]
    deletions = LayerWriter(os.path.join(directory, "layer-2.tar.gz"))
    layer2 = _deletions_layer(
        deletions,
        paths_deleted=removed + [f"usr/share/doc/{d}" for d in docs]
        + [f"usr/share/locale/{d}" for d in locales],
        dirs_emptied=["usr/share/man", "usr/share/info", "var/cache/debconf"],
        changed_files={"etc/motd": b"tosi-tools benchmark image\n"},
    )
    return BuiltImage(
        name="", description=f"Debian {DEBIAN_SUITE} minbase + packages + deletions (debootstrap)",
        layers=[layer0, layer1, layer2],
        entries=len(base_members) + len(layer1_members) + deletions.entries,
        unpacked_bytes=_count(base, base_members) + _count(full, layer1_members),
        extra={"packages": DEBIAN_PACKAGES})
