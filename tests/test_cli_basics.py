"""Every executable answers --help and --version, and reports usage errors in one line."""

import pytest

from tosi_tools import __version__

COMMANDS = ["tosi", "tosi-resolve", "tosi-fetch", "tosi-verify", "tosi-unpack", "tosi-mount"]


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
