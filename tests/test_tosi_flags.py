"""The umbrella's command line: the original's flags in every Go flag form, and the
checks that need no registry."""

import logging
import subprocess
import sys

import pytest

from tosi_tools import __version__
from tosi_tools.cli import tosi as cli
from tosi_tools.errors import UsageError

VALUE_FLAGS = {
    "image": "127.0.0.1:5000/test/app:1", "extractto": "/tmp/x", "mount": "/tmp/m",
    "workdir": "/tmp/w", "overlaydir": "/tmp/o", "saveconfig": "/tmp/c.json",
    "parallel-downloads": "8", "username": "me", "password": "secret", "url": "http://h:5",
    "v": "2", "vmodule": "pull=3", "log_dir": "/tmp/logs", "stderrthreshold": "INFO",
    "log_backtrace_at": "pull.go:42", "platform": "linux/arm64/v8", "mount-option": "nosuid,noexec",
    "min-free": "64M", "authfile": "/tmp/auth.json", "ca-file": "/tmp/ca.pem",
    "mirror": "https://cache.example.com:5000",
}
BOOL_FLAGS = ["validate-cache", "version", "logtostderr", "alsologtostderr", "password-stdin",
              "insecure", "progress", "read-only", "keep-root-mode"]


def parsed(value, flag):
    kind = cli.FLAG_BY_NAME[flag].kind
    return int(value) if kind == cli.INT else (value,) if kind == cli.LIST else value


def test_every_original_and_new_flag_is_defined():
    assert set(VALUE_FLAGS) | set(BOOL_FLAGS) == set(cli.FLAG_BY_NAME)


@pytest.mark.parametrize("form", ["-{} {}", "-{}={}", "--{} {}", "--{}={}"])
@pytest.mark.parametrize("flag", sorted(VALUE_FLAGS))
def test_value_flag_is_accepted_in_every_form(flag, form):
    argv = form.format(flag, VALUE_FLAGS[flag]).split(" ")
    assert cli.parse_flags(argv)[flag] == parsed(VALUE_FLAGS[flag], flag)


@pytest.mark.parametrize("form,expected", [("-{}", True), ("--{}", True), ("-{}=true", True),
                                           ("--{}=false", False), ("-{}=0", False),
                                           ("--{}=T", True)])
@pytest.mark.parametrize("flag", BOOL_FLAGS)
def test_bool_flag_is_accepted_in_every_form(flag, form, expected):
    assert cli.parse_flags([form.format(flag)])[flag] is expected


def test_defaults_are_the_originals():
    values = cli.parse_flags([])
    assert values["workdir"] == "/tmp/tosi"
    assert values["parallel-downloads"] == 4
    assert values["overlaydir"] is None and values["progress"] is None


def test_bool_flag_never_takes_the_next_argument():
    with pytest.raises(UsageError, match="unexpected argument 'false'"):
        cli.parse_flags(["-insecure", "false"])


def test_value_taken_from_the_next_argument_may_start_with_a_dash():
    assert cli.parse_flags(["-password", "-x-"])["password"] == "-x-"


def test_flag_without_its_value_is_a_usage_error():
    with pytest.raises(UsageError, match="flag needs an argument: -image"):
        cli.parse_flags(["-image"])


def test_integer_flag_refuses_a_non_integer():
    with pytest.raises(UsageError, match="-parallel-downloads"):
        cli.parse_flags(["-parallel-downloads", "many"])


def test_invalid_boolean_value_is_a_usage_error():
    with pytest.raises(UsageError, match="invalid boolean value 'maybe' for -insecure"):
        cli.parse_flags(["-insecure=maybe"])


def test_parsing_stops_at_double_dash():
    with pytest.raises(UsageError, match="unexpected argument '-image'"):
        cli.parse_flags(["--", "-image", "x"])


@pytest.mark.parametrize("argv,level", [
    ([], logging.WARNING), (["-v", "1"], logging.INFO), (["-v=2"], logging.DEBUG),
    (["-logtostderr"], logging.INFO), (["-alsologtostderr"], logging.INFO),
    (["-stderrthreshold", "INFO"], logging.INFO), (["-stderrthreshold=0"], logging.INFO),
    (["-stderrthreshold=FATAL"], logging.WARNING),
])
def test_logging_flags_set_the_stderr_level(argv, level):
    assert cli.log_level(cli.parse_flags(argv)) == level


def test_unknown_stderrthreshold_is_a_usage_error(tool):
    proc = tool("tosi", "-image", "x", "-stderrthreshold", "LOUD", check=2)
    assert "-stderrthreshold" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("argv", [["-version"], ["--version"], ["-version=true"],
                                  ["-image", "x", "-version"]])
def test_version_prints_semver_on_stdout_and_exits_zero(tool, argv):
    proc = tool("tosi", *argv, check=0)
    assert proc.stdout == f"tosi version {__version__}\n"
    assert proc.stderr == ""


def test_version_does_not_import_requests():
    code = ("import sys; from tosi_tools.cli.tosi import main; rc = main(['-version']); "
            "print('requests' in sys.modules, 'tosi_tools.pipeline' in sys.modules, "
            "file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stderr.split() == ["False", "False"]


@pytest.mark.parametrize("argv", [["-h"], ["-help"], ["--help"]])
def test_help_lists_every_flag_on_stdout(tool, argv):
    proc = tool("tosi", *argv, check=0)
    for name in cli.FLAG_BY_NAME:
        assert f"\n  -{name}" in proc.stdout, name
    assert proc.stderr == ""


@pytest.mark.parametrize("argv,message", [
    (["-nope"], "flag provided but not defined: -nope"),
    (["--image=x", "positional"], "unexpected argument 'positional'"),
    (["-extractto", "/tmp/x"], "-image is required"),
    (["-image", "x", "-password", "p", "-password-stdin"], "mutually exclusive"),
    (["-image", "x", "-parallel-downloads", "-1"], "-parallel-downloads"),
    (["-image", "x", "-parallel-downloads", "65"], "-parallel-downloads must be from 0 (one per layer) to 64"),
    (["-image", "x", "-parallel-downloads", "1" + "0" * 20], "-parallel-downloads must be from 0"),
    (["-image", "x", "-parallel-downloads", "1e20"], "not an integer"),
    (["-image", "x", "-extractto", ""], "-extractto needs a non-empty value"),
    (["---image", "x"], "bad flag syntax"),
])
def test_bad_command_line_is_one_line_and_exit_two(tool, argv, message):
    proc = tool("tosi", *argv, check=2)
    assert proc.stderr.startswith("tosi: error: ") and message in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stdout == ""
