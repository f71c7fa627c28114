"""Every executable answers --help and --version, and reports usage errors in one line."""

import pytest

from tosi_tools import __version__

COMMANDS = ["tosi", "tosi-resolve", "tosi-fetch", "tosi-verify", "tosi-unpack", "tosi-mount", "tosi-gc"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_exits_zero_and_names_the_command(tool, cmd):
    proc = tool(cmd, "--help", check=0)
    assert cmd in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("cmd", COMMANDS)
def test_version_prints_the_package_version(tool, cmd):
    proc = tool(cmd, "--version", check=0)
    assert proc.stdout.strip() == f"{cmd} version {__version__}"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_unknown_flag_is_one_line_usage_error(tool, cmd):
    proc = tool(cmd, "--no-such-flag", check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{cmd}: error: ")
    assert proc.stdout == ""


# What --version and --help must not load (HACKING: flags are parsed before heavy imports).
HTTP_MODULES = {"requests", "urllib3", "http.client", "tqdm"}


def modules_imported(stderr):
    """The modules a run imported, from its PYTHONPROFILEIMPORTTIME report on stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("flag", ["--version", "--help"])
@pytest.mark.parametrize("cmd", COMMANDS)
def test_version_and_help_load_no_http_library(tool, cmd, flag):
    proc = tool(cmd, flag, env={"PYTHONPROFILEIMPORTTIME": "1"}, check=0)
    loaded = modules_imported(proc.stderr)
    assert "tosi_tools.cli.common" in loaded  # the report covers the command's own imports
    assert loaded & HTTP_MODULES == set()


STAGES = ["tosi-resolve", "tosi-fetch", "tosi-verify", "tosi-unpack", "tosi-mount"]
PLAN_READERS = ["tosi-fetch", "tosi-verify", "tosi-unpack", "tosi-mount"]


def workdir_help(tool, cmd, tosi_workdir):
    """The --help text of `cmd`'s --workdir flag, on one line, with $TOSI_WORKDIR set to `tosi_workdir`."""
    lines = tool(cmd, "--help", env={"TOSI_WORKDIR": tosi_workdir}, check=0).stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("--workdir DIR"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" " * 8))
    return " ".join(" ".join(lines[start:end]).split())


@pytest.mark.parametrize("cmd", STAGES)
def test_help_names_the_value_of_tosi_workdir_as_the_default(tool, cmd):
    assert "$TOSI_WORKDIR, here /srv/cache)" in workdir_help(tool, cmd, "/srv/cache")


@pytest.mark.parametrize("cmd", STAGES)
def test_help_names_tmp_tosi_as_the_default_when_tosi_workdir_is_empty(tool, cmd):
    assert "/tmp/tosi, as $TOSI_WORKDIR is unset)" in workdir_help(tool, cmd, "")


@pytest.mark.parametrize("cmd", PLAN_READERS)
def test_help_of_a_stage_reading_a_plan_says_the_plans_workdir_comes_first(tool, cmd):
    text = workdir_help(tool, cmd, "/srv/cache")
    assert "(default: the plan's workdir, which must be a tosi workdir; if it names none, " in text


def test_help_of_resolve_gives_the_environment_default_alone(tool):
    assert workdir_help(tool, "tosi-resolve", "/srv/cache").endswith(
        "(default: $TOSI_WORKDIR, here /srv/cache)")


def test_a_percent_sign_in_tosi_workdir_is_shown_as_it_is(tool):
    assert "here /srv/100%)" in workdir_help(tool, "tosi-resolve", "/srv/100%")
