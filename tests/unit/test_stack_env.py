"""build/stack.env (stack/env_file.py): values a shell and ``read_stack_env`` read back as written, an
atomic replace, mode 0600, and a reader that tells a running stack from a stopped or vanished one."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from stack import env_file
from stack.env_file import (
    StackEnvFile,
    format_stack_env,
    read_stack_env,
    running_stack_env,
    write_stack_env,
)
from stack.errors import StackEnvError, StackError, StackNotRunning
from stack.up import StackPaths, exclusive

AWKWARD = {
    "RECSERVE_REDIS_URLS": "redis://127.0.0.1:6379/0,redis://127.0.0.1:6380/0",
    "RECSERVE_EVENTS_API_KEY": "it's a 'key' with $HOME, `ticks`, \"quotes\" and spaces",
    "STACK_API_URL": "http://127.0.0.1:8080/v1/recommendations/1?n=5&page_type=home",
    "STACK_EMPTY": "",
    "STACK_UNICODE": "café ☕",
}


def test_values_read_back_as_written(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    write_stack_env(path, AWKWARD)
    assert read_stack_env(path) == AWKWARD


def test_a_shell_sources_the_same_values(tmp_path: Path) -> None:
    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no POSIX shell")
    path = tmp_path / "stack.env"
    write_stack_env(path, AWKWARD)
    # Each value printed NUL-terminated, so that spaces and quotes arrive as the shell holds them.
    printed = "".join(f'printf "%s\\0" "${key}"; ' for key in AWKWARD)
    out = subprocess.run([shell, "-c", f"set -a; . {path}; {printed}"], capture_output=True, check=True)
    assert out.stdout.decode().split("\0")[:-1] == list(AWKWARD.values())


def test_the_file_is_mode_0600_and_replaced_not_rewritten_in_place(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    path.write_text("OLD=1\n")
    path.chmod(0o644)
    before = path.stat().st_ino
    write_stack_env(path, {"NEW": "2"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A new inode: a reader holding the old file keeps reading whole old content, then finds the new one.
    assert path.stat().st_ino != before
    assert read_stack_env(path) == {"NEW": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.env"]  # no temporary file left behind


def test_a_value_that_cannot_be_one_line_leaves_the_old_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    write_stack_env(path, {"A": "1"})
    with pytest.raises(StackEnvError, match=r"expected a one-line value for SECRET, but found a line break"):
        write_stack_env(path, {"A": "2", "SECRET": "two\nlines"})
    assert read_stack_env(path) == {"A": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.env"]


def test_a_key_that_is_no_shell_name_is_refused() -> None:
    with pytest.raises(StackEnvError, match=r"expected keys that are shell variable names .* but found 'BAD-KEY'"):
        format_stack_env({"BAD-KEY": "1"})


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        ("just words", r"line 3: expected KEY=value"),
        ("A='unclosed", r"line 3: expected one shell word after A="),
        ("A=two words", r"line 3: expected one shell word after A=, but found 2 words"),
    ],
)
def test_a_malformed_line_is_reported_by_number(tmp_path: Path, line: str, rule: str) -> None:
    path = tmp_path / "stack.env"
    path.write_text(f"# comment\n\n{line}\n")
    with pytest.raises(StackEnvError, match=rule):
        read_stack_env(path)


def test_no_file_means_no_stack(tmp_path: Path) -> None:
    with pytest.raises(StackNotRunning, match=r"expected a running local stack .* but found no such file"):
        read_stack_env(tmp_path / "stack.env")


def test_running_stack_env_needs_state_running_and_a_live_supervisor(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    file = StackEnvFile(path, {env_file.PID: str(os.getpid()), env_file.API_URL: "http://127.0.0.1:8080"})
    file.mark_stopped("never started")
    assert not path.exists()  # nothing written yet: nothing to mark
    file.write(**{env_file.STATE: env_file.RUNNING})
    assert running_stack_env(path)[env_file.API_URL] == "http://127.0.0.1:8080"

    file.mark_stopped("Ctrl-C")
    with pytest.raises(StackNotRunning, match=r"found STACK_STATE=stopped \(Ctrl-C\)"):
        running_stack_env(path)
    assert read_stack_env(path)[env_file.STOP_REASON] == "Ctrl-C"  # the record stays readable


def test_a_running_file_whose_supervisor_is_gone_is_not_a_running_stack(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    path = tmp_path / "stack.env"
    write_stack_env(path, {env_file.STATE: env_file.RUNNING, env_file.PID: str(gone.pid)})
    with pytest.raises(StackNotRunning, match=rf"found STACK_PID={gone.pid}, a process that no longer runs"):
        running_stack_env(path)


def test_one_stack_per_build_folder_and_a_stale_file_goes_when_the_next_one_starts(tmp_path: Path) -> None:
    paths = StackPaths(tmp_path)
    write_stack_env(paths.env_file, {env_file.STATE: env_file.RUNNING, env_file.PID: "1"})
    held = rf"expected no other local stack on {re.escape(str(tmp_path))}, but pid {os.getpid()} runs one"
    with exclusive(paths):
        assert not paths.env_file.exists()  # it described a run that has ended: this one holds the lock
        with pytest.raises(StackError, match=held), exclusive(paths):
            pass
    with exclusive(paths):  # released with the first
        pass


def test_make_up_generates_a_key_unless_one_is_set() -> None:
    from stack.api_key import sample_requests, stack_api_key

    made = stack_api_key({})
    assert made.generated and made.settings["RECSERVE_EVENTS_API_KEYS"] == f"stack:{made.key}" and len(made.key) >= 16
    assert stack_api_key({}).key != made.key
    kept = stack_api_key({"RECSERVE_EVENTS_API_KEYS": "ops:ops-key-0123456789abc,ci:ci-key-0123456789abcd"})
    assert not kept.generated and kept.settings == {} and kept.key == "ops-key-0123456789abc"
    write = sample_requests("http://127.0.0.1:8080", made.key, "1", "12")[1]
    assert f"-H 'X-API-Key: {made.key}'" in write
