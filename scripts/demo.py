"""Demo: a throwaway local registry, a generated image, and tosi pulling it."""

import os
import shutil
import subprocess
import sys
import tempfile

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOP)

from tests.support.images import (  # noqa: E402
    Pusher, dir_entry, file_entry, make_layer, symlink_entry, whiteout_entry,
)
from tests.support.registry import Registry  # noqa: E402

BIN = os.path.join(TOP, "bin")


def say(text):
    print(f"\n== {text}", flush=True)


def run(*args, **kw):
    print("$ " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, os.path.join(BIN, args[0]), *args[1:]], check=True, **kw)


def show_tree(root):
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            shown = os.path.normpath(os.path.join(rel, name))
            if os.path.islink(path):
                print(f"  {shown} -> {os.readlink(path)}")
            else:
                print(f"  {shown} ({os.lstat(path).st_size} bytes)")


def main():
    base = tempfile.mkdtemp(prefix="tosi-demo-")
    registry = Registry(os.path.join(base, "registry"))
    os.makedirs(registry.workdir)
    try:
        say("starting a throwaway docker-registry on 127.0.0.1")
        registry.start()
        print(f"registry at {registry.url}")

        say("pushing a generated two-layer image demo/hello:1.0")
        lower = make_layer([
            dir_entry("etc"), file_entry("etc/motd", b"hello from tosi-tools\n"),
            file_entry("etc/obsolete.conf", b"to be deleted by the next layer\n"),
            dir_entry("bin"), file_entry("bin/hello", b"#!/bin/sh\ncat /etc/motd\n", mode=0o755),
        ], oci=True)
        upper = make_layer([
            whiteout_entry("etc/obsolete.conf"), symlink_entry("etc/greeting", "motd"),
        ], compression="zstd")
        image = Pusher(registry.url).push_image("demo/hello", "1.0", [lower, upper], oci=True)
        print(f"pushed {image.digest}")
        ref = f"{registry.host}/demo/hello:1.0"
        workdir = os.path.join(base, "cache")

        say("tosi -image ... -extractto (the original tool's command line)")
        rootfs = os.path.join(base, "rootfs")
        run("tosi", "-image", ref, "-workdir", workdir, "-extractto", rootfs,
            "-saveconfig", os.path.join(base, "config.json"))
        show_tree(rootfs)
        with open(os.path.join(base, "config.json")) as f:
            print(f"saved config: {f.read().strip()}")

        say("the same through the pipeline of stages")
        piped = os.path.join(base, "rootfs-piped")
        cmd = (f"{sys.executable} {BIN}/tosi-resolve --workdir {workdir} {ref}"
               f" | {sys.executable} {BIN}/tosi-fetch --workdir {workdir}"
               f" | {sys.executable} {BIN}/tosi-verify --workdir {workdir}"
               f" | {sys.executable} {BIN}/tosi-unpack --workdir {workdir} --into {piped}")
        print("$ tosi-resolve IMG | tosi-fetch | tosi-verify | tosi-unpack --into DIR")
        plan = subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout
        print("plan written by the last stage:")
        for line in plan.splitlines():
            print("  " + (line if len(line) < 160 else line[:157] + "..."))
        same = subprocess.run(["diff", "-r", "--no-dereference", rootfs, piped]).returncode == 0
        print(f"trees identical: {same}")

        if os.geteuid() == 0:
            say("tosi -mount (overlayfs with the cached layers as lowerdirs)")
            mnt = os.path.join(base, "mnt")
            run("tosi", "-image", ref, "-workdir", workdir, "-mount", mnt)
            show_tree(mnt)
            run("tosi-mount", "--unmount", "--clean", mnt)
        else:
            say("skipping -mount: overlay mounts need root")
        say("done")
        return 0
    finally:
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
