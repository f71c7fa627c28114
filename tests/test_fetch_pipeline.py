"""tosi-resolve | tosi-fetch | tosi-verify through real pipes, as a user runs them."""

import os
import subprocess
import sys

from tests.conftest import BIN
from tests.support.plans import assert_cached, parse_plan, random_layer, records_text
from tosi_tools.cache import Workdir


def pipeline(*commands, env=None, timeout=60):
    """Run the commands with each one's stdout on the next one's stdin; (returncodes, out, errs)."""
    procs, stdin = [], subprocess.DEVNULL
    for argv in commands:
        proc = subprocess.Popen([sys.executable, os.path.join(BIN, argv[0]), *argv[1:]], stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})
        if procs:
            procs[-1].stdout.close()  # the next process owns the pipe now
        procs.append(proc)
        stdin = proc.stdout
    out, err = procs[-1].communicate(timeout=timeout)
    errs = [p.stderr.read() for p in procs[:-1]] + [err]
    for p in procs:
        p.wait(timeout)
        p.stderr.close()
    return [p.returncode for p in procs], out, errs


def test_resolve_fetch_verify_pipeline_caches_and_verifies_every_blob(registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", [random_layer(300_000), random_layer(10_000)])
    codes, out, errs = pipeline(
        ["tosi-resolve", "--workdir", workdir, f"{registry.host}/{repo_name}:v1"],
        ["tosi-fetch"],  # the workdir comes with the plan
        ["tosi-verify"])
    assert codes == [0, 0, 0], errs
    records = parse_plan(out)
    assert [r["digest"] for r in records[1:]] == [layer.digest for layer in image.layers]
    cache = Workdir(workdir)
    assert [r["path"] for r in records[1:]] == [cache.layer_path(layer.digest) for layer in image.layers]
    assert_cached(workdir, image.layers)


def test_fetch_over_tls_trusts_the_ca_file_named_in_the_plan(tls_registry, tls_pusher, repo_name, workdir):
    image = tls_pusher.push_image(repo_name, "v1", [random_layer(50_000)])
    codes, out, errs = pipeline(
        ["tosi-resolve", "--workdir", workdir, "--ca-file", tls_registry.ca_file,
         f"{tls_registry.host}/{repo_name}:v1"],
        ["tosi-fetch"])
    assert codes == [0, 0], errs
    assert_cached(workdir, image.layers)


def test_fetch_without_the_ca_fails_with_a_tls_error(tls_registry, tls_pusher, repo_name, workdir):
    image = tls_pusher.push_image(repo_name, "v1", [random_layer(50_000)])
    resolved = subprocess.run(
        [sys.executable, os.path.join(BIN, "tosi-resolve"), "--workdir", workdir, "--ca-file",
         tls_registry.ca_file, f"{tls_registry.host}/{repo_name}:v1"],
        capture_output=True, text=True, check=True).stdout
    records = parse_plan(resolved)
    assert records[0]["caFile"] == tls_registry.ca_file
    records[0]["caFile"] = None
    plan = records_text(records)
    proc = subprocess.run([sys.executable, os.path.join(BIN, "tosi-fetch"), "--retries", "0"],
                          input=plan, capture_output=True, text=True,
                          env={**os.environ, "REQUESTS_CA_BUNDLE": ""})
    assert proc.returncode == 1
    assert "TLS" in proc.stderr and proc.stderr.count("\n") == 1
    assert not os.path.exists(Workdir(workdir).layer_path(image.layers[0].digest))
