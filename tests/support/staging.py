"""Stage an image for tosi-unpack: push it to the real registry, then `tosi-resolve | tosi-fetch`.

The plan the tests feed tosi-unpack is the one the real stages write, with
the layer blobs in the workdir's cache. Also: comparing two trees, and a
read-only overlay mount of per-layer directories.
"""

import hashlib
import os
import stat
import subprocess
import sys

from tests.support.plans import parse_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(cmd):
    return [sys.executable, os.path.join(ROOT, "bin", cmd)]


def fetched_plan(registry, image, workdir):
    """(plan text, records) for a pushed image, its layer blobs in `workdir`'s cache."""
    ref = f"{registry.host}/{image.repo}@{image.digest}"
    resolve = subprocess.run(_tool("tosi-resolve") + ["--workdir", workdir, ref],
                             capture_output=True, text=True, timeout=60)
    assert resolve.returncode == 0, resolve.stderr
    fetch = subprocess.run(_tool("tosi-fetch") + ["--workdir", workdir, "--progress", "never"],
                           input=resolve.stdout, capture_output=True, text=True, timeout=120)
    assert fetch.returncode == 0, fetch.stderr
    return fetch.stdout, parse_plan(fetch.stdout)


def stage_image(pusher, registry, repo, layers, workdir, tag="latest", oci=False):
    """Push `layers` (tests.support.images.Layer) as repo:tag and return (plan text, records)."""
    image = pusher.push_image(repo, tag, layers, oci=oci)
    return fetched_plan(registry, image, workdir)


def run_unpack(plan, *args, env=None, timeout=120):
    """Run bin/tosi-unpack on a plan text; CompletedProcess with text output."""
    full_env = dict(os.environ)
    full_env.pop("TOSI_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(_tool("tosi-unpack") + list(map(str, args)), input=plan,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


# ---------------------------------------------------------------- comparing trees

def snapshot(root, with_dir_mtimes=False):
    """What a tree holds, comparable between two trees: {relative path: attributes}.

    Attributes: type, mode, uid, gid, size, content hash, symlink target, rdev,
    xattrs (overlayfs' own excluded), mtime (not for directories unless asked),
    and the other names of a hardlinked file.
    """
    entries = {}
    inodes = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""] if dirpath == root else [*dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            info = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                    "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    info["sha256"] = hashlib.sha256(f.read()).hexdigest()
                info["size"] = st.st_size
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
                info.pop("mode")
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if not stat.S_ISLNK(st.st_mode):
                info["xattrs"] = {k: os.getxattr(path, k, follow_symlinks=False)
                                  for k in os.listxattr(path, follow_symlinks=False)
                                  if not k.startswith(("trusted.overlay.", "security.selinux"))}
            if with_dir_mtimes or not stat.S_ISDIR(st.st_mode):
                info["mtime"] = st.st_mtime_ns
            entries[rel] = info
    for names in inodes.values():
        if len(names) > 1:
            for name in names:
                entries[name]["links"] = sorted(names)
    return entries


class OverlayView:
    """A read-only overlay mount of per-layer directories (top layer last in `lowers`)."""

    def __init__(self, base, lowers):
        self.base = base
        self.target = os.path.join(base, "merged")
        self.lowers = list(lowers)

    def __enter__(self):
        os.makedirs(self.target, exist_ok=True)
        lowers = []
        for path in reversed(self.lowers):
            # overlayfs refuses a directory twice; a repeated layer is all shadowed by
            # its topmost copy, so that one is enough.
            if path not in lowers:
                lowers.append(path)
        if len(lowers) < 2:  # overlayfs wants two lowerdirs without an upperdir
            empty = os.path.join(self.base, "empty")
            os.makedirs(empty, exist_ok=True)
            lowers.append(empty)
        cwd = os.path.commonpath(lowers)
        option = "lowerdir=" + ":".join(os.path.relpath(p, cwd) for p in lowers)
        subprocess.run(["mount", "-t", "overlay", "-o", f"ro,{option}", "overlay", self.target],
                       cwd=cwd, check=True, capture_output=True)
        return self.target

    def __exit__(self, *exc):
        subprocess.run(["umount", self.target], check=True)
