"""Finding (and, for a full run, installing) the programs the benchmarks compare against."""

import os
import shutil
import subprocess

from .report import log

# executable -> Debian package that ships it
PACKAGES = {
    "skopeo": "skopeo",
    "umoci": "umoci",
    "podman": "podman",
    "debootstrap": "debootstrap",
    "curl": "curl",
    "tar": "tar",
    "gzip": "gzip",
    "time": "time",  # GNU time, for peak RSS
}

_VERSION_FLAGS = {"tar": ["--version"], "curl": ["--version"], "gzip": ["--version"]}


def ensure(names, install):
    """Map each executable in `names` to its path, or None when missing.

    With `install`, missing ones are apt-get installed first (one `apt-get update`,
    then one install per package so that one failing, podman say, leaves the
    others installed).
    """
    missing = [n for n in names if not shutil.which(n)]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        log(f"installing {' '.join(PACKAGES[n] for n in missing)} (apt-get)")
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        for name in missing:
            proc = subprocess.run(["apt-get", "install", "-y", "-q", PACKAGES[name]], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                log(f"could not install {PACKAGES[name]}: {proc.stderr.strip().splitlines()[-1:]}")
    return {n: shutil.which(n) for n in names}


def version(path):
    """First line of `<tool> --version` (or `version`), for the results file."""
    name = os.path.basename(path)
    flags = _VERSION_FLAGS.get(name, ["--version"])
    try:
        proc = subprocess.run([path, *flags], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None
