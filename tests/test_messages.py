"""Errors that say what to do (issue 15): an unknown flag names the nearest one, a
message names flags as the command that runs spells them (tosi's -username, a
stage's --username; never a flag the command does not have), and the exit statuses
are the ones --help and the man pages list."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import BIN, ROOT
from tests.support.images import file_entry, make_layer
from tests.support.plans import records_text
from tests.support.staging import fetched_plan

STAGES = ["tosi-resolve", "tosi-fetch", "tosi-verify", "tosi-unpack", "tosi-mount"]
COMMANDS = ["tosi", *STAGES]


def one_error_line(proc, status):
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---------------------------------------------------------------- unknown flags

@pytest.mark.parametrize("typo, meant", [("-extracto", "-extractto"), ("--workdri", "-workdir"),
                                          ("-parallel-download", "-parallel-downloads")])
def test_tosi_names_the_flag_nearest_to_an_unknown_one(tool, typo, meant):
    line = one_error_line(tool("tosi", typo, "/tmp/x"), 2)
    assert line.endswith(f"; did you mean {meant}?")


@pytest.mark.parametrize("cmd", STAGES)
def test_a_stage_names_the_flag_nearest_to_an_unknown_one(tool, cmd):
    line = one_error_line(tool(cmd, "--workdri", "/tmp/x", "IMAGE", input=""), 2)
    assert "did you mean --workdir?" in line


def test_a_stage_given_tosis_one_dash_flag_names_its_own(tool):
    line = one_error_line(tool("tosi-unpack", "-workdir", "/tmp/x", input=""), 2)
    assert "unrecognized arguments: -workdir" in line and "did you mean --workdir?" in line


def test_an_unknown_flag_near_no_known_one_names_none(tool):
    line = one_error_line(tool("tosi", "-zzzzzz"), 2)
    assert line == "tosi: error: flag provided but not defined: -zzzzzz"


# ---------------------------------------------------------------- flags in messages

def test_tosi_names_its_own_credential_flags(tool, registry):
    line = one_error_line(tool("tosi", "-image", f"{registry.host}/test/x:1", "-username", "me"), 2)
    assert line == "tosi: error: -username needs -password or -password-stdin"


def test_a_stage_names_its_double_dash_credential_flags(tool, registry):
    line = one_error_line(tool("tosi-resolve", "--username", "me", f"{registry.host}/test/x:1"), 2)
    assert line == "tosi-resolve: error: --username needs --password or --password-stdin"


def test_tosi_at_a_registry_asking_for_credentials_says_minus_username(tool, htpasswd_registry, workdir):
    line = one_error_line(tool("tosi", "-image", f"{htpasswd_registry.host}/test/x:1",
                               "-workdir", workdir), 1)
    assert "-username" in line and "--username" not in line


def test_tosi_names_minus_platform_for_an_image_without_this_platform(tool, registry, pusher, repo_name,
                                                                      workdir):
    arm = pusher.push_image(repo_name, None, [make_layer([file_entry("arch", b"arm64\n")])], oci=True,
                            arch="arm64", variant="v8")
    pusher.push_index(repo_name, "arm-only", [arm])
    line = one_error_line(tool("tosi", "-image", f"{registry.host}/{repo_name}:arm-only",
                               "-workdir", workdir), 1)
    assert "choose one with -platform" in line


def test_tosi_over_an_earlier_mounts_changes_says_what_tosi_can_do(tool, registry, tmp_path):
    upper = tmp_path / "rootfs.upper"
    upper.mkdir()
    (upper / "changed").write_text("earlier")
    line = one_error_line(tool("tosi", "-image", f"{registry.host}/test/x:1", "-mount", tmp_path / "rootfs"), 2)
    assert "mount with -read-only, or choose another mount point" in line
    assert " --keep-upper" not in line.replace("tosi-mount --keep-upper", "")


def test_a_mount_option_ro_names_the_commands_read_only_flag(tool, registry, tmp_path):
    line = one_error_line(tool("tosi", "-image", f"{registry.host}/test/x:1", "-mount", tmp_path / "m",
                               "-mount-option", "ro"), 2)
    assert line == "tosi: error: mount option 'ro': use -read-only for a read-only mount"


def test_a_non_empty_extractto_target_of_tosi_names_minus_extractto(tool, registry, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    line = one_error_line(tool("tosi", "-image", f"{registry.host}/test/x:1", "-extractto", tmp_path / "full"), 2)
    assert line == f"tosi: error: -extractto {tmp_path / 'full'}: directory is not empty"


# ---------------------------------------------------------------- exit statuses

def help_statuses(tool, cmd):
    text = " ".join(tool(cmd, "--help", check=0).stdout.split())
    paragraph = text[text.index("exit status:"):]
    return [int(n) for n in re.findall(r"(?:^|; )(\d+) ", paragraph.split(": ", 1)[1])]


def man_statuses(cmd):
    with open(os.path.join(ROOT, "man", f"{cmd}.1")) as f:
        section = f.read().split(".SH EXIT STATUS", 1)[1].split("\n.SH ", 1)[0]
    return [int(n) for n in re.findall(r"^\.B (\d+)$", section, re.M)]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_lists_the_exit_statuses_of_the_man_page(tool, cmd):
    assert help_statuses(tool, cmd) == man_statuses(cmd) == [0, 1, 2, 130, 143]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_says_a_target_that_must_be_empty_is_exit_2_where_the_command_has_one(tool, cmd):
    text = " ".join(tool(cmd, "--help", check=0).stdout.split())
    has_target = cmd in ("tosi", "tosi-unpack", "tosi-mount")
    assert ("that is not empty" in text) == has_target


def test_mount_onto_a_non_empty_directory_exits_2_as_extractto_does(tool, registry, tmp_path):
    for flag in ("-mount", "-extractto"):
        target = tmp_path / flag.lstrip("-")
        target.mkdir()
        (target / "keep").write_text("mine")
        line = one_error_line(tool("tosi", "-image", f"{registry.host}/test/x:1", flag, target), 2)
        assert "not empty" in line


def test_mount_onto_a_file_exits_2(tool, registry, tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_error_line(tool("tosi", "-image", f"{registry.host}/test/x:1", "-mount", tmp_path / "file"), 2)
    assert "exists and is not a directory" in line


def test_a_failure_of_the_registry_exits_1(tool, registry, workdir):
    line = one_error_line(tool("tosi-resolve", "--workdir", workdir, f"{registry.host}/test/absent:1"), 1)
    assert "absent" in line


# ---------------------------------------------------------------- whom a message blames

def fetched_then_edited(registry, pusher, repo_name, workdir, **fields):
    """A one-layer gzip image resolved and fetched into `workdir`, its layer record's
    `fields` then set by hand: (plan text, the layer's digest)."""
    image = pusher.push_image(repo_name, "1", [make_layer([file_entry("f", b"f\n")])], oci=True)
    _, records = fetched_plan(registry, image, workdir)
    records[1].update(fields)
    return records_text(records), records[1]["digest"]


def test_a_hand_edited_media_type_is_said_to_disagree_with_the_blob_not_blamed_on_the_registry(
        tool, registry, pusher, repo_name, workdir):
    zstd = "application/vnd.oci.image.layer.v1.tar+zstd"
    plan, digest = fetched_then_edited(registry, pusher, repo_name, workdir, mediaType=zstd)
    line = one_error_line(tool("tosi-unpack", "--workdir", workdir, input=plan), 1)
    assert line == (f"tosi-unpack: error: layer 0 ({digest}): the plan's mediaType {zstd} says zstd, "
                    "but the blob is gzip-compressed (the blob matches its digest: the plan, or the "
                    "manifest it was resolved from, is wrong)")


def test_a_hand_edited_diff_id_is_said_to_disagree_with_the_content_not_blamed_on_the_registry(
        tool, registry, pusher, repo_name, workdir):
    other = "sha256:" + "ab" * 32
    plan, digest = fetched_then_edited(registry, pusher, repo_name, workdir, diffID=other)
    line = one_error_line(tool("tosi-unpack", "--workdir", workdir, input=plan), 1)
    assert line.startswith(f"tosi-unpack: error: layer 0 ({digest}): uncompressed content hashes to sha256:")
    assert line.endswith(f", not to the plan's diffID {other} (the blob matches its digest: the plan, or "
                         "the image config it was resolved from, is wrong)")


def blocked_reading_stdin(pid):
    """Whether the process is in read(0, ...) (x86_64 and arm64 numbers), /proc/PID/syscall."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] in ("0", "63") and int(fields[1], 16) == 0


@pytest.mark.parametrize("cmd", ["tosi-fetch", "tosi-verify", "tosi-unpack"])
def test_a_stage_interrupted_while_it_waits_for_its_plan_exits_130(cmd, workdir):
    proc = subprocess.Popen([sys.executable, os.path.join(BIN, cmd), "--workdir", workdir],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not blocked_reading_stdin(proc.pid):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert stderr == f"{cmd}: error: interrupted\n"
