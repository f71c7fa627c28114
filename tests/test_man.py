"""The man pages: they render without a warning, have the standard sections, and
document every option that the commands' --help lists."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MAN = os.path.join(ROOT, "man")
COMMANDS = ["tosi", "tosi-resolve", "tosi-fetch", "tosi-verify", "tosi-unpack", "tosi-mount", "tosi-gc"]
PAGES = [f"{cmd}.1" for cmd in COMMANDS] + ["tosi-plan.5"]
COMMAND_SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "FILES",
                    "EXAMPLES", "SEE ALSO"]
PLAN_SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "VERSIONING", "IMAGE RECORD",
                 "LAYER RECORD", "FILES", "EXAMPLES", "SEE ALSO"]


def render(page):
    return subprocess.run(
        ["groff", "-man", "-ww", "-Tutf8", "-P-cbou", os.path.join(MAN, page)],
        capture_output=True, text=True, timeout=30)


def help_options(tool, cmd):
    """Every option string in the option list of `cmd --help` (-x, --long, -flag)."""
    options = set()
    for line in tool(cmd, "--help", check=0).stdout.splitlines():
        if re.match(r"^ {2}-", line):
            options.update(re.findall(r"(?:^|,\s)(--?[A-Za-z][\w-]*)", line.strip()))
    return options


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_any_groff_warning(page):
    proc = render(page)
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert len(proc.stdout.splitlines()) > 40


@pytest.mark.parametrize("page", PAGES)
def test_page_has_the_standard_sections_in_order(page):
    headings = [line for line in render(page).stdout.splitlines() if re.match(r"^[A-Z][A-Z ]+$", line)]
    wanted = PLAN_SECTIONS if page.endswith(".5") else COMMAND_SECTIONS
    assert [h for h in headings if h in wanted] == wanted


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_option_in_help_is_documented_in_the_page(tool, cmd):
    options = help_options(tool, cmd)
    assert {"--version", "--help"} <= options or {"-version", "-help"} <= options
    text = render(f"{cmd}.1").stdout
    documented = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))
    assert options - documented == set()


def test_umbrella_page_documents_every_original_flag():
    text = render("tosi.1").stdout
    for flag in ["-image", "-extractto", "-mount", "-workdir", "-overlaydir", "-saveconfig",
                 "-parallel-downloads", "-username", "-password", "-validate-cache", "-version",
                 "-url", "-v", "-vmodule", "-logtostderr", "-alsologtostderr", "-log_dir",
                 "-stderrthreshold", "-log_backtrace_at", "-platform", "-password-stdin",
                 "-insecure", "-progress", "-read-only"]:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag


def test_pages_are_installed_with_the_package_where_man_finds_them(tmp_path):
    # The package's own data_files, installed as pip installs them (setuptools' install_data).
    subprocess.run([sys.executable, "-W", "ignore", "-c", "import setuptools; setuptools.setup()",
                    "-q", "install_data", "--install-dir", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    for page in PAGES:
        installed = tmp_path / "share" / "man" / f"man{page[-1]}" / page
        with open(os.path.join(MAN, page), "rb") as f:
            assert installed.read_bytes() == f.read(), page
    proc = subprocess.run(["man", "-M", str(tmp_path / "share" / "man"), "-P", "cat", "tosi-mount"],
                          capture_output=True, text=True, timeout=30, env={**os.environ, "MANWIDTH": "80"})
    assert proc.returncode == 0 and "--unmount" in proc.stdout


def test_plan_page_documents_every_field_the_stages_write():
    text = render("tosi-plan.5").stdout
    fields = ["type", "planVersion", "reference", "registry", "endpoint", "repository", "tag",
              "digest", "mediaType", "size", "manifestPath", "index", "platform", "config",
              "savedConfig", "workdir", "layerCount", "insecure", "caFile", "rootfs", "mount",
              "target", "upper", "work", "readOnly", "overlaydir", "options", "urls", "annotations",
              "diffID", "path", "overlay", "link", "applied", "mirrors", "servedBy"]
    for field in fields:
        assert re.search(rf"\b{field}\b", text), field


def _field_names(value):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from _field_names(inner)


def test_plan_page_documents_every_field_of_real_plans(tool, pusher, registry, repo_name, tmp_path):
    from tests.support.images import file_entry, make_layer

    one = pusher.push_image(repo_name, None, [make_layer([file_entry("a", b"a")])], oci=True)
    pusher.push_index(repo_name, "1", [one])
    ref = f"{registry.host}/{repo_name}:1"
    resolved = tool("tosi-resolve", "--workdir", tmp_path / "w", ref, check=0).stdout
    fetched = tool("tosi-fetch", "--progress", "never", input=resolved, check=0).stdout
    plans = [tool("tosi-unpack", "--into", tmp_path / "flat", input=fetched, check=0).stdout]
    unpacked = tool("tosi-unpack", input=fetched, check=0).stdout
    target = str(tmp_path / "mnt")
    try:
        plans.append(tool("tosi-mount", target, input=unpacked, check=0).stdout)
    finally:
        tool("tosi-mount", "--unmount", target)
    fields = {name for plan in plans for line in plan.splitlines()
              for name in _field_names(json.loads(line))}
    assert {"index", "mount", "rootfs", "overlay", "applied", "path"} <= fields
    text = render("tosi-plan.5").stdout
    assert {field for field in fields if not re.search(rf"\b{re.escape(field)}\b", text)} == set()


# ---------------------------------------------------------------- where man finds them

def man_where(args, venv_bin, manpath=None):
    """`man -w ARGS` as a user with `venv_bin` first on PATH (and MANPATH if given)."""
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    env["PATH"] = f"{venv_bin}:/usr/local/bin:/usr/bin:/bin"
    if manpath is not None:
        env["MANPATH"] = manpath
    return subprocess.run(["man", "-w", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("args, page", [(["tosi"], "tosi.1"), (["tosi-fetch"], "tosi-fetch.1"),
                                        (["5", "tosi-plan"], "tosi-plan.5")])
def test_man_finds_the_pages_of_the_set_up_venv_on_path(args, page):
    proc = man_where(args, os.path.join(ROOT, ".venv", "bin"))
    assert proc.returncode == 0, proc.stderr
    assert os.path.realpath(proc.stdout.strip()) == os.path.join(MAN, page)


def test_man_finds_the_pages_through_the_readmes_manpath_line():
    proc = man_where(["tosi"], "/nonexistent", manpath=os.path.join(ROOT, ".venv", "share", "man") + ":")
    assert proc.returncode == 0, proc.stderr
    assert os.path.realpath(proc.stdout.strip()) == os.path.join(MAN, "tosi.1")


@pytest.mark.slow
def test_man_tosi_works_after_the_readmes_set_up_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True, timeout=120)
    setup = subprocess.run([str(clone / "scripts" / "setup-env")], capture_output=True, text=True,
                           timeout=900)
    assert setup.returncode == 0, setup.stderr
    assert "Editable install" not in setup.stderr  # setuptools' warning is quieted
    proc = man_where(["tosi"], str(clone / ".venv" / "bin"))
    assert proc.returncode == 0, proc.stderr
    assert os.path.realpath(proc.stdout.strip()) == str(clone / "man" / "tosi.1")
