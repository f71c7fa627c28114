"""The measured commands: tosi's and the tools it is compared with.

Each competitor measures one image on one filesystem (a `Target`) and returns
{row key: Sample}. Everything it makes lives in fresh directories on the
target's filesystem and is removed after the measurement (untimed). `setup` runs
once per target, untimed, for what a "warm" measurement needs in place.
"""

import os
import shlex
import shutil
import subprocess
import sys

from . import BIN, ROOT
from .measure import CommandFailed, Sample, sequence, timed
from .scratch import remove_tree


def python():
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def tosi(command, *args):
    return [python(), os.path.join(BIN, command), *map(str, args)]


class Target:
    """One pushed image on one filesystem under test."""

    def __init__(self, image_key, image, registry, repo, tag, scratch):
        self.image_key = image_key
        self.image = image
        self.registry = registry
        self.repo = repo
        self.tag = tag
        self.scratch = scratch
        self.state = {}       # warm workdirs and layouts, per competitor
        self._blob_copies = None

    @property
    def ref(self):
        return f"{self.registry.host}/{self.repo}:{self.tag}"

    def blob_url(self, digest):
        return f"{self.registry.url}/v2/{self.repo}/blobs/{digest}"

    def blob_copies(self):
        """The layer blobs as files on this filesystem, bottom first (tar's input)."""
        if self._blob_copies is None:
            directory = self.scratch.fresh("blobs")
            self._blob_copies = []
            for blob in self.image.layers:
                dest = os.path.join(directory, os.path.basename(blob.path))
                shutil.copyfile(blob.path, dest)
                self._blob_copies.append(dest)
        return self._blob_copies


class Competitor:
    needs = ()          # executables that must be installed
    rows = {}           # row key -> what the row measures
    profiled = False    # run once more under a profiler with --profile

    def setup(self, target):
        pass

    def measure(self, target, wrap=list):
        """Measure once; `wrap(argv)` gives the argv to run (a profiler puts itself in front)."""
        raise NotImplementedError


def _umount(path):
    subprocess.run(["umount", path], stderr=subprocess.DEVNULL, check=False)


# ---------------------------------------------------------------- tosi

def tosi_pull(target, mode, destination, workdir):
    """`tosi -image REF -extractto|-mount DESTINATION -workdir WORKDIR`."""
    return tosi("tosi", "-image", target.ref, f"-{mode}", destination, "-workdir", workdir)


def warm_workdir(target):
    """A workdir that has pulled the image and mounted it once (so its overlays exist)."""
    if "tosi-warm" not in target.state:
        run = target.scratch.fresh("tosi-warm")
        workdir = f"{run}/workdir"
        timed(tosi_pull(target, "extractto", f"{run}/rootfs", workdir), label="tosi -extractto (warming up)")
        remove_tree(f"{run}/rootfs")
        try:
            timed(tosi_pull(target, "mount", f"{run}/mnt", workdir), label="tosi -mount (warming up)")
        finally:
            _umount(f"{run}/mnt")
        target.state["tosi-warm"] = workdir
    return target.state["tosi-warm"]


class Tosi(Competitor):
    """tosi -extractto or -mount into a fresh directory, from a cold (empty) or the warm workdir."""

    def __init__(self, mode, warm):
        self.mode = mode
        self.warm = warm
        temperature = "warm" if warm else "cold"
        self.row = f"tosi-{mode}-{temperature}"
        self.rows = {self.row: f"tosi -{mode}, {temperature} workdir"}
        # the subjects of the goals: a cold pull, and a warm mount
        self.profiled = (mode == "extractto") != warm

    def setup(self, target):
        if self.warm:
            warm_workdir(target)

    def measure(self, target, wrap=list):
        run = target.scratch.fresh(self.row)
        workdir = warm_workdir(target) if self.warm else f"{run}/workdir"
        destination = f"{run}/{'mnt' if self.mode == 'mount' else 'rootfs'}"
        try:
            return {self.row: timed(wrap(tosi_pull(target, self.mode, destination, workdir)), label="tosi")}
        finally:
            if self.mode == "mount":
                _umount(destination)
            remove_tree(run)


class TosiWithoutIsal(Tosi):
    """The cold -extractto with zlib decoding gzip, as where `isal` cannot be installed:
    an `isal` module that fails to import is put first on the path."""

    def __init__(self):
        super().__init__("extractto", warm=False)
        self.row = "tosi-extractto-cold-zlib"
        self.rows = {self.row: "tosi -extractto, cold workdir, zlib (no isal)"}
        self.profiled = False

    def measure(self, target, wrap=list):
        run = target.scratch.fresh(self.row)
        shim = os.path.join(run, "no-isal")
        os.makedirs(shim)
        with open(os.path.join(shim, "isal.py"), "w") as f:
            f.write("raise ImportError('isal left out by the benchmark')\n")
        env = dict(os.environ, PYTHONPATH=shim)
        try:
            return {self.row: timed(wrap(tosi_pull(target, "extractto", f"{run}/rootfs", f"{run}/workdir")),
                                    env=env, label="tosi")}
        finally:
            remove_tree(run)


class TosiSerial(Tosi):
    """The cold -extractto with every layer applied in the target in turn
    (TOSI_STAGE_MIN_BYTES=off): what staging the layers above the first gains."""

    def __init__(self):
        super().__init__("extractto", warm=False)
        self.row = "tosi-extractto-cold-serial"
        self.rows = {self.row: "tosi -extractto, cold workdir, layers in turn (no staging)"}
        self.profiled = False

    def measure(self, target, wrap=list):
        run = target.scratch.fresh(self.row)
        env = dict(os.environ, TOSI_STAGE_MIN_BYTES="off")
        try:
            return {self.row: timed(wrap(tosi_pull(target, "extractto", f"{run}/rootfs", f"{run}/workdir")),
                                    env=env, label="tosi")}
        finally:
            remove_tree(run)


class TosiStartup(Competitor):
    """`tosi -version`: starting the interpreter and the command, the floor under every tosi row."""

    rows = {"tosi-version": "tosi -version (start-up, the floor)"}

    def measure(self, target, wrap=list):
        return {"tosi-version": timed(wrap(tosi("tosi", "-version")), label="tosi -version")}


class TosiUnpackInto(Competitor):
    """tosi-unpack --into alone, on a plan that tosi-resolve | tosi-fetch made beforehand."""

    rows = {"tosi-unpack-into": "tosi-unpack --into"}
    profiled = True

    def setup(self, target):
        if "tosi-plan" in target.state:
            return
        run = target.scratch.fresh("tosi-unpack")
        workdir, plan = f"{run}/workdir", f"{run}/plan.jsonl"
        pipeline = (f"{shlex.join(tosi('tosi-resolve', '--workdir', workdir, target.ref))} | "
                    f"{shlex.join(tosi('tosi-fetch', '--workdir', workdir))} > {shlex.quote(plan)}")
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise CommandFailed(f"tosi-resolve | tosi-fetch failed: {lines[-1] if lines else proc.returncode}")
        target.state["tosi-plan"] = (workdir, plan)

    def measure(self, target, wrap=list):
        workdir, plan = target.state["tosi-plan"]
        run = target.scratch.fresh("tosi-into")
        try:
            return {"tosi-unpack-into": timed(
                wrap(tosi("tosi-unpack", "--workdir", workdir, "--into", f"{run}/rootfs")),
                stdin_path=plan, stdout_path=f"{run}/plan-out.jsonl", label="tosi-unpack")}
        finally:
            remove_tree(run)


# ---------------------------------------------------------------- references

class TarXzf(Competitor):
    """GNU tar over the layer blobs already on disk, in order: no whiteout work, the near limit."""

    needs = ("tar", "gzip")
    rows = {"tar-xzf": "tar -xzf of the layer blobs, in order"}

    def setup(self, target):
        target.blob_copies()

    def measure(self, target, wrap=list):
        run = target.scratch.fresh("tar")
        try:
            return {"tar-xzf": sequence(
                (f"tar {i}", ["tar", "-xzf", blob, "-C", run])
                for i, blob in enumerate(target.blob_copies()))}
        finally:
            remove_tree(run)


class Curl(Competitor):
    """The wire: curl fetching the same blobs one after the other over one connection."""

    needs = ("curl",)
    rows = {"curl": "curl of the layer blobs, sequential"}

    def measure(self, target, wrap=list):
        run = target.scratch.fresh("curl")
        argv = ["curl", "-sS", "--fail", "-L"]
        for i, blob in enumerate(target.image.layers):
            argv += ["-o", f"{run}/layer-{i}", target.blob_url(blob.digest)]
        try:
            return {"curl": timed(argv)}
        finally:
            remove_tree(run)


def skopeo_copy(target, layout):
    return ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{target.ref}",
            f"oci:{layout}:{target.tag}"]


class SkopeoUmoci(Competitor):
    needs = ("skopeo", "umoci")
    rows = {"skopeo-umoci": "skopeo copy + umoci unpack",
            "skopeo-copy": "skopeo copy (part)", "umoci-unpack": "umoci unpack (part)"}

    def measure(self, target, wrap=list):
        run = target.scratch.fresh("skopeo-umoci")
        try:
            total = sequence([
                ("skopeo copy", skopeo_copy(target, f"{run}/layout")),
                ("umoci unpack", ["umoci", "unpack", "--image", f"{run}/layout:{target.tag}", f"{run}/bundle"]),
            ])
            return {"skopeo-umoci": total,
                    "skopeo-copy": _part(total, "skopeo copy"), "umoci-unpack": _part(total, "umoci unpack")}
        finally:
            remove_tree(run)


def _part(total, label):
    # A sequence's part as a row of its own: its time; CPU and RSS are the whole's.
    return Sample(total.parts[label], total.cpu_seconds, total.max_rss_kib)


class UmociUnpack(Competitor):
    """umoci unpack alone, of an OCI layout that skopeo copied beforehand."""

    needs = ("skopeo", "umoci")
    rows = {"umoci-unpack": "umoci unpack"}

    def setup(self, target):
        if "oci-layout" not in target.state:
            layout = f"{target.scratch.fresh('oci')}/layout"
            timed(skopeo_copy(target, layout), label="skopeo copy")
            target.state["oci-layout"] = layout

    def measure(self, target, wrap=list):
        run = target.scratch.fresh("umoci")
        try:
            return {"umoci-unpack": timed(
                ["umoci", "unpack", "--image", f"{target.state['oci-layout']}:{target.tag}", f"{run}/bundle"],
                label="umoci unpack")}
        finally:
            remove_tree(run)


class PodmanPull(Competitor):
    """podman pull into a throwaway storage root (overlay driver), then again: it has the image."""

    needs = ("podman",)
    rows = {"podman-pull": "podman pull, empty storage",
            "podman-pull-again": "podman pull, image already there"}

    def measure(self, target, wrap=list):
        run = target.scratch.fresh("podman")
        argv = ["podman", "--root", f"{run}/storage", "--runroot", f"{run}/run",
                "--storage-driver", "overlay", "--events-backend", "none",
                "pull", "-q", "--tls-verify=false", target.ref]
        try:
            first = timed(argv, label="podman pull")
            again = timed(argv, label="podman pull")
            return {"podman-pull": first, "podman-pull-again": again}
        finally:
            remove_tree(run)
