"""k8s/base/sync/artifact-sync.sh on real folders: ``promote`` makes LIVE follow STAGING one whole version
folder at a time, and ``sync`` runs rounds of ``aws s3 sync`` + promote (an ``aws`` stand-in on PATH copies a
local folder, and fails when told to, since there is no object storage here).

The script runs in the aws-cli image, whose /bin/sh is bash; each test runs it under dash too, the stricter
POSIX shell, so that nothing bash-only slips in."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.waiting import poll

SCRIPT = Path(__file__).resolve().parents[2] / "k8s" / "base" / "sync" / "artifact-sync.sh"
SHELLS = [shell for shell in ("dash", "bash") if shutil.which(shell)]


@pytest.fixture(params=SHELLS)
def shell(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(shell: str, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [shell, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def files(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones too) -> its content, or "/" for a folder."""
    return {str(p.relative_to(root)): "/" if p.is_dir() else p.read_text() for p in sorted(root.rglob("*"))}


def hidden(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob(".*")]


def repository(root: Path, versions: dict[str, list[int]], config: str = "max_batch_size: 64") -> Path:
    """A Triton model repository: per model a config.pbtxt and one folder per version."""
    for model, numbers in versions.items():
        write(root / model / "config.pbtxt", f'name: "{model}"\n{config}\n')
        for n in numbers:
            write(root / model / str(n) / "model.onnx", f"{model} weights of version {n}")
    return root


def test_promote_fills_an_empty_live_folder(shell: str, tmp_path: Path) -> None:
    staging = repository(tmp_path / "staging", {"ranker_onnx": [1], "ranker_torchscript": [1]})
    live = tmp_path / "live"
    done = run(shell, "promote", staging, live)
    assert done.returncode == 0, done.stderr
    assert files(live) == files(staging)
    assert "added" in done.stderr


def test_promote_adds_retires_and_replaces_leaving_unchanged_versions_alone(shell: str, tmp_path: Path) -> None:
    live = repository(tmp_path / "live", {"ranker_onnx": [1, 2], "ranker_torchscript": [1, 2]})
    kept = live / "ranker_onnx" / "2"
    kept_stat = (kept.stat(), (kept / "model.onnx").stat())
    unchanged_config = (live / "ranker_torchscript" / "config.pbtxt").stat()

    staging = repository(tmp_path / "staging", {"ranker_onnx": [2, 3], "ranker_torchscript": [2, 3]})
    write(staging / "ranker_onnx" / "config.pbtxt", 'name: "ranker_onnx"\nmax_batch_size: 128\n')
    write(staging / "new_model" / "config.pbtxt", 'name: "new_model"\n')
    write(staging / "new_model" / "7" / "model.onnx", "new")
    done = run(shell, "promote", staging, live)
    assert done.returncode == 0, done.stderr

    assert files(live) == files(staging)
    assert not hidden(tmp_path), f"expected no hidden leftovers, found {hidden(tmp_path)}"
    # Version 2 was there already: neither the folder nor its file was rewritten.
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == (kept_stat[0].st_ino, kept_stat[0].st_mtime_ns)
    model = (kept / "model.onnx").stat()
    assert (model.st_ino, model.st_mtime_ns) == (kept_stat[1].st_ino, kept_stat[1].st_mtime_ns)
    # A config whose content did not change is not replaced either (a polling Triton would reload the model).
    assert (live / "ranker_torchscript" / "config.pbtxt").stat().st_ino == unchanged_config.st_ino
    assert (live / "ranker_onnx" / "config.pbtxt").read_text().endswith("max_batch_size: 128\n")
    for line in ("added", "removed", "updated"):
        assert line in done.stderr, done.stderr


def test_promote_changes_nothing_when_staging_has_not_changed(shell: str, tmp_path: Path) -> None:
    staging = repository(tmp_path / "staging", {"ranker_onnx": [1, 2]})
    live = tmp_path / "live"
    assert run(shell, "promote", staging, live).returncode == 0
    before = {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in [live, *live.rglob("*")]}
    again = run(shell, "promote", staging, live)
    assert again.returncode == 0 and again.stderr == ""
    assert {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in [live, *live.rglob("*")]} == before


def test_promote_takes_a_version_folder_whole_and_fixes_one_caught_half_uploaded(shell: str, tmp_path: Path) -> None:
    """A bundle's v<N>/ is a version folder too; one that lacks a file of STAGING's (a sync round caught the
    upload half done) is swapped for the whole one. Files a reader added to a version folder do not count."""
    staging, live = tmp_path / "staging", tmp_path / "live"
    write(staging / "v1" / "item_index.faiss", "index 1")
    write(staging / "v1" / "item_index.json", "{}")
    write(staging / "v2" / "item_index.faiss", "index 2")  # its item_index.json is still uploading
    assert run(shell, "promote", staging, live).returncode == 0
    write(live / "v1" / "__pycache__" / "model.pyc", "the reader's own")
    v1 = (live / "v1").stat().st_ino
    write(staging / "v2" / "item_index.json", '{"version": 2}')
    done = run(shell, "promote", staging, live)
    assert done.returncode == 0, done.stderr
    assert (live / "v1").stat().st_ino == v1 and (live / "v1" / "__pycache__" / "model.pyc").is_file()
    assert files(live / "v2") == files(staging / "v2")
    assert "replaced" in done.stderr and str(live / "v2") in done.stderr and str(live / "v1") not in done.stderr


def test_promote_stages_beside_live_and_leaves_nothing_behind(shell: str, tmp_path: Path) -> None:
    """Copies are made in .live.incoming beside LIVE (never in a model folder, which a polling Triton would
    reload), and that folder goes, a leftover of an interrupted run included."""
    staging = repository(tmp_path / "staging", {"ranker_onnx": [1, 2]})
    live = repository(tmp_path / "live", {"ranker_onnx": [1]})
    write(tmp_path / ".live.incoming" / "x1" / "new" / "model.onnx", "half")
    write(staging / "ranker_onnx" / "config.pbtxt", "max_batch_size: 8\n")
    # cp and mv that log their arguments, then run the real ones.
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    for tool in ("cp", "mv"):
        real = shutil.which(tool)
        write(bin_dir / tool, f'#!/bin/sh\necho {tool} "$@" >> {calls}\nexec {real} "$@"\n').chmod(0o755)
    done = run(shell, "promote", staging, live, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert files(live) == files(staging)
    assert not hidden(tmp_path), f"expected no hidden leftovers, found {hidden(tmp_path)}"
    incoming = f"{tmp_path}/.live.incoming/"
    for call in calls.read_text().splitlines():
        tool, source, target = call.split()[0], call.split()[-2], call.split()[-1]
        if tool == "cp":
            assert target.startswith(incoming), f"a copy must be made beside LIVE, not in it: {call}"
        else:  # a rename from the work folder into place
            assert source.startswith(incoming) and target in (
                f"{live}/ranker_onnx/2",
                f"{live}/ranker_onnx/config.pbtxt",
            )


def test_promote_refuses_a_live_folder_on_another_filesystem(shell: str, tmp_path: Path) -> None:
    """A rename across filesystems is a copy, which a reader could see half done."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temporary folder")
    elsewhere = Path(tempfile.mkdtemp(dir=shm))
    try:
        (tmp_path / "live").symlink_to(elsewhere, target_is_directory=True)
        staging = repository(tmp_path / "staging", {"ranker_onnx": [1]})
        done = run(shell, "promote", staging, tmp_path / "live")
        assert done.returncode == 1 and "is not on the filesystem of its parent folder" in done.stderr
        assert not list(elsewhere.iterdir()) and not hidden(tmp_path)
    finally:
        shutil.rmtree(elsewhere)


def test_promote_refuses_an_empty_staging_folder(shell: str, tmp_path: Path) -> None:
    live = repository(tmp_path / "live", {"ranker_onnx": [1]})
    before = files(live)
    (tmp_path / "staging").mkdir()
    done = run(shell, "promote", tmp_path / "staging", live)
    assert done.returncode == 1 and "is empty" in done.stderr
    assert files(live) == before
    missing = run(shell, "promote", tmp_path / "nowhere", live)
    assert missing.returncode == 1 and "is not a folder" in missing.stderr


def test_usage_errors(shell: str, tmp_path: Path) -> None:
    for args in ([], ["promote", "a"], ["sync", "s3://b/p", "a"], ["sync", "s3://b/p", "a", "b", "0"],
                 ["sync", "s3://b/p", "a", "b", "15", "--exclude"], ["copy", "a", "b"]):  # fmt: skip
        done = run(shell, *args)
        assert done.returncode == 2 and "usage:" in done.stderr, (args, done.stderr)


# ------------------------------------------------------------------------------------------------- sync

FAKE_AWS = f"""#!{sys.executable}
# Stands in for `aws s3 sync [options] SOURCE DEST`: records its arguments, fails while $FAIL_FILE exists, else
# mirrors the local folder the source URI names (s3://bucket/<folder>) into DEST as aws does: files copied,
# files the source lacks deleted, the folders they leave empty kept.
import os, shutil, sys
from pathlib import Path

with open(os.environ["AWS_CALLS"], "a") as calls:
    calls.write(" ".join(sys.argv[1:]) + "\\n")
if os.path.exists(os.environ["FAIL_FILE"]):
    sys.exit("fake aws: failing as told")
source = Path(os.environ["SOURCE_ROOT"]) / sys.argv[-2].removeprefix("s3://bucket/")
dest = Path(sys.argv[-1])
wanted = {{p.relative_to(source) for p in source.rglob("*") if p.is_file()}}
for path in [p for p in dest.rglob("*") if p.is_file() and p.relative_to(dest) not in wanted]:
    path.unlink()
for relative in wanted:
    (dest / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / relative, dest / relative)
"""


@pytest.fixture
def fake_aws(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    write(bin_dir / "aws", FAKE_AWS).chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "AWS_CALLS": str(tmp_path / "aws-calls"),
        "FAIL_FILE": str(tmp_path / "fail"),
        "SOURCE_ROOT": str(tmp_path / "bucket"),
    }


def test_sync_once_copies_the_source_then_promotes(shell: str, tmp_path: Path, fake_aws: dict[str, str]) -> None:
    source = repository(tmp_path / "bucket" / "repo", {"ranker_onnx": [1]})
    staging, live = tmp_path / "models" / "staging", tmp_path / "models" / "live"
    done = run(shell, "sync", "s3://bucket/repo/", staging, live, "--", "--exclude", "*", "--include", "*/1/*",
               env=fake_aws)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert files(live) == files(source)
    call = Path(fake_aws["AWS_CALLS"]).read_text().splitlines()
    assert call == [f"s3 sync --no-progress --delete --exclude * --include */1/* s3://bucket/repo/ {staging}"]

    # An emptied version folder (what `aws s3 sync --delete` leaves of a deleted version) is a retired one.
    shutil.rmtree(source / "ranker_onnx" / "1")
    write(source / "ranker_onnx" / "2" / "model.onnx", "2")
    assert run(shell, "sync", "s3://bucket/repo/", staging, live, env=fake_aws).returncode == 0
    assert sorted(p.name for p in (live / "ranker_onnx").iterdir()) == ["2", "config.pbtxt"]

    Path(fake_aws["FAIL_FILE"]).touch()
    failed = run(shell, "sync", "s3://bucket/repo/", staging, live, env=fake_aws)
    assert failed.returncode == 1 and "failed: LIVE" in failed.stderr


def test_sync_loop_retries_a_failed_round_and_stops_on_sigterm(
    shell: str, tmp_path: Path, fake_aws: dict[str, str]
) -> None:
    source = repository(tmp_path / "bucket" / "repo", {"ranker_onnx": [1]})
    live = tmp_path / "models" / "live"
    Path(fake_aws["FAIL_FILE"]).touch()
    calls = Path(fake_aws["AWS_CALLS"])
    heartbeat = tmp_path / "round"
    loop = subprocess.Popen(
        [shell, str(SCRIPT), "sync", "s3://bucket/repo/", str(tmp_path / "models" / "staging"), str(live), "1"],
        env=fake_aws | {"ARTIFACT_SYNC_HEARTBEAT": str(heartbeat)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        poll(lambda: calls.exists() and len(calls.read_text().splitlines()) >= 2, 20, "two failed aws rounds")
        assert loop.poll() is None, "a failed round must not end the loop"
        touched = heartbeat.stat().st_mtime_ns
        poll(lambda: heartbeat.stat().st_mtime_ns > touched, 20, "the heartbeat touched by the next round")
        Path(fake_aws["FAIL_FILE"]).unlink()
        poll(lambda: (live / "ranker_onnx" / "1" / "model.onnx").is_file(), 20, "version 1 promoted")
        write(source / "ranker_onnx" / "2" / "model.onnx", "2")
        poll(lambda: (live / "ranker_onnx" / "2" / "model.onnx").is_file(), 20, "version 2 promoted next round")
        loop.send_signal(signal.SIGTERM)
        assert loop.wait(timeout=5) == 0, "SIGTERM ends the loop at once (the sleep runs under `wait`)"
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
        stderr = loop.stderr.read() if loop.stderr else ""
    assert "fake aws: failing as told" in stderr and "failed: LIVE" in stderr
    assert files(live) == files(source)
