"""gzip layers are decoded by isal where the package installs it (a plain dependency on
Linux x86_64 and aarch64, issue 14) and by zlib where isal cannot be imported."""

import importlib.metadata
import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_tool
from tests.support.images import dir_entry, file_entry, make_layer


def no_isal_env(tmp_path):
    """PYTHONPATH with an `isal` module that fails to import, as where it is not installed."""
    shim = tmp_path / "no-isal"
    shim.mkdir()
    (shim / "isal.py").write_text("raise ImportError('isal is not installed here')\n")
    return {"PYTHONPATH": str(shim)}


def gzip_decoder(env):
    code = "import tosi_tools.compression as c; print(c._gzip_module.__name__)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, **env}).stdout.strip()


def test_the_package_requires_isal_on_linux_x86_64_and_aarch64():
    requirements = importlib.metadata.requires("tosi-tools") or []
    isal = [r for r in requirements if r.replace(" ", "").startswith("isal") and "extra" not in r]
    assert len(isal) == 1, requirements
    assert "x86_64" in isal[0] and "aarch64" in isal[0]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="isal has no wheel for this machine")
def test_gzip_is_decoded_by_isal_where_the_package_installs_it():
    assert gzip_decoder({}) == "isal.igzip"


def test_a_pull_decodes_gzip_layers_with_zlib_where_isal_cannot_be_imported(tmp_path, pusher, registry, repo_name):
    env = no_isal_env(tmp_path)
    assert gzip_decoder(env) == "gzip"
    body = os.urandom(300_000) + b"\0" * 300_000
    layers = [make_layer([dir_entry("data"), file_entry("data/big", body)]),
              make_layer([file_entry("data/small", b"small\n", mode=0o600)])]
    pusher.push_image(repo_name, "1", layers)
    target = tmp_path / "rootfs"
    run_tool("tosi", "-image", f"{registry.host}/{repo_name}:1", "-extractto", target,
             "-workdir", tmp_path / "workdir", env=env, check=0)
    assert (target / "data" / "big").read_bytes() == body
    assert (target / "data" / "small").read_bytes() == b"small\n"
