"""The load test of a running stack, without one: stack.env into the run's settings, the bundle of the
served version, the stack's processes in a fake /proc, and the summary of hand-made steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.running import (
    RunningStack,
    best_latency_step,
    component_pids,
    find_bundle,
    is_redis_on,
    load_steps,
    locust_env,
    main,
    summary,
    warm_step_count,
    with_figures,
    write_limit_note,
)
from stack.env_file import read_stack_env, write_stack_env
from stack.errors import StackEnvError, StackError
from stack.up import StackPaths, stack_env_values


def write_env(build: Path, **extra: str) -> Path:
    """A stack.env as ``make up`` writes it (Redis with a password, to see that it stays out of results)."""
    settings = {
        "RECSERVE_REDIS_URLS": "redis://:hunter2@127.0.0.1:6390/0",
        "RECSERVE_INDEX_PATH": str(build / "artifacts" / "shop" / "v{version}" / "item_index.faiss"),
        "RECSERVE_EVENTS_API_KEYS": "stack:s3cret,ops:other",
    }
    values = stack_env_values(
        settings,
        "http://127.0.0.1:8099",
        "redis://:hunter2@127.0.0.1:6390/0",
        StackPaths(build),
        extra={"STACK_DATASET": "shop", "STACK_MODEL_VERSION": "m1", "STACK_TRITON_GRPC_URL": "127.0.0.1:8701"},
    )
    path = build / "stack.env"
    write_stack_env(path, values | {"STACK_ORCHESTRATOR_PID": "4242", **extra})
    return path


def write_bundle(folder: Path, version: str) -> None:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model_version": version}))


def test_stack_env_gives_the_address_key_settings_and_pids(tmp_path: Path) -> None:
    path = write_env(tmp_path)
    stack = RunningStack.from_env(read_stack_env(path), path)
    assert stack.api_url == "http://127.0.0.1:8099" and stack.api_port == 8099
    assert stack.api_key == "s3cret"  # the first configured key, which locust's events carry
    assert stack.redis_urls == ("redis://:hunter2@127.0.0.1:6390/0",)
    assert (stack.dataset, stack.model_version, stack.orchestrator_pid) == ("shop", "m1", 4242)
    public = stack.public_settings()
    assert public["RECSERVE_EVENTS_API_KEYS"] == "<redacted>"
    assert public["RECSERVE_REDIS_URLS"] == "redis://:<redacted>@127.0.0.1:6390/0"
    assert "s3cret" not in json.dumps(public) and "hunter2" not in json.dumps(public)


def test_a_stack_env_without_an_api_key_is_refused(tmp_path: Path) -> None:
    path = write_env(tmp_path, RECSERVE_EVENTS_API_KEYS="")
    with pytest.raises(StackEnvError, match=r"expected RECSERVE_EVENTS_API_KEYS \(written by `make up`\)"):
        RunningStack.from_env(read_stack_env(path), path)


def test_the_bundle_is_the_one_of_the_served_version(tmp_path: Path) -> None:
    path = write_env(tmp_path)
    for number, version in ((1, "m1"), (2, "m2")):
        write_bundle(tmp_path / "artifacts" / "shop" / f"v{number}", version)
    stack = RunningStack.from_env(read_stack_env(path), path)
    assert find_bundle(stack, "m2") == tmp_path / "artifacts" / "shop" / "v2"
    with pytest.raises(StackError, match=r"expected the bundle of model version 'm3' .* found \['m1', 'm2'\]"):
        find_bundle(stack, "m3")
    # Without the orchestrator's index path: the data set's folder beside stack.env.
    bare = RunningStack.from_env({**read_stack_env(path), "RECSERVE_INDEX_PATH": ""}, path)
    assert find_bundle(bare, "m1") == tmp_path / "artifacts" / "shop" / "v1"


def test_the_stacks_processes_are_found_by_their_ports(tmp_path: Path) -> None:
    path = write_env(tmp_path, STACK_ORCHESTRATOR_PID="")
    proc = tmp_path / "proc"
    commands = {
        11: ["/venv/bin/python", "-m", "orchestrator", "--port", "8099", "--workers", "1"],
        12: ["/venv/bin/python", "-m", "orchestrator", "--port", "8080"],
        21: ["redis-server 127.0.0.1:6390"],  # the title redis-server gives itself
        22: ["redis-server", "--port", "6391"],
        31: ["/opt/tritonserver/bin/tritonserver", "--grpc-port=8701", "--http-port=8700"],
    }
    for pid, argv in commands.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (proc / "self").mkdir()
    stack = RunningStack.from_env(read_stack_env(path), path)
    assert component_pids(stack, proc) == {"orchestrator": 11, "redis": 21, "triton": 31}
    assert is_redis_on(commands[22], 6391) and not is_redis_on(commands[21], 639)


def test_steps_grow_past_the_scenarios_and_the_locust_env_never_empties_the_cache(tmp_path: Path) -> None:
    assert load_steps((10, 20, 40), None) == (10, 20, 40)
    assert load_steps((10, 20, 40), 25) == (10, 20, 25)
    assert load_steps((10, 20, 40), 70) == (10, 20, 40, 50, 70)
    assert warm_step_count(25.0, 10.0) == 3 and warm_step_count(0.0, 10.0) == 0
    path = write_env(tmp_path)
    env = locust_env(RunningStack.from_env(read_stack_env(path), path), tmp_path / "b", [5, 5, 10, 20], 2, "latency")
    assert env["LOADTEST_STEPS"] == "5,5,10,20" and env["LOADTEST_WARM_STEPS"] == "2"
    assert env["LOADTEST_FIXED_STEPS"] == "3" and env["LOADTEST_API_KEY"] == "s3cret"
    assert env["LOADTEST_REDIS_URL"] == "" and env["LOADTEST_EMPTY_CACHE_AT"] == ""


def step(index: int, users: int, p99: float, warmup: bool = False, **extra: object) -> dict[str, object]:
    return {
        "step": index,
        "warmup": warmup,
        "users": users,
        "offered_rps": users * 10.0,
        "achieved_rps": users * 10.0,
        "requests": users * 100,
        "p50_ms": p99 / 4,
        "p99_ms": p99,
        "failure_share": 0.0,
        "fallback_share": 0.0,
        "latency_ok": p99 < 100,
        "slo_ok": p99 < 100,
        "sources": {"cache": 9 * users, "realtime": users},
        "cpu_s": {"orchestrator": users * 0.05, "redis": users * 0.01},
        "load_generator_cores": 0.3,
        **extra,
    }


def test_hit_rates_cpu_per_request_and_the_summary() -> None:
    timeline = [
        {"step": 0, "hits_local": 0.0, "hits_redis": 0.0, "misses": 0.0},
        {"step": 0, "hits_local": 5.0, "hits_redis": 0.0, "misses": 5.0},  # warm-up: 50%
        # From the last sample before the step: 80 hits of 100 lookups.
        {"step": 1, "hits_local": 80.0, "hits_redis": 5.0, "misses": 25.0},
        {"step": 2, "hits_local": 100.0, "hits_redis": 5.0, "misses": 45.0},
    ]
    run = {
        "steps": [
            step(0, 10, 20.0, warmup=True, sources={"cache": 1, "realtime": 1}),
            step(1, 20, 40.0),
            step(2, 40, 150.0, fallback_share=0.05, slo_ok=False),
        ],
        "timeline": timeline,
    }
    steps = with_figures(run)
    assert [s["metrics_hit_rate"] for s in steps] == [0.5, 0.8, 0.5]
    assert [s["answer_hit_rate"] for s in steps] == [0.5, 0.9, 0.9]
    # 20 users x 100 requests; 1.0 s + 0.2 s of CPU.
    assert steps[1]["cpu_ms_per_request"] == {"orchestrator": 0.5, "redis": 0.1, "service": 0.6}
    best = best_latency_step(steps)
    assert best is not None and best["step"] == 1  # the warm-up step is never the best
    results = {
        "command": "python -m loadtest.running --warm 10",
        "date": "2025-01-02 03:04 UTC",
        "machine": "2 cores (test CPU)",
        "stack": {"api_url": "http://127.0.0.1:8099", "dataset": "shop", "served_model_version": "m1"},
        "bundle": "/b/v1",
        "skew": "Zipf",
        "scenario": "mix90",
        "warm_s": 10.0,
        "pids": {"orchestrator": 1, "redis": 2},
        "steps": steps,
        "best": best,
        "best_slo": best,
        "out": "/o",
    }
    text = summary(results)
    assert "`python -m loadtest.running --warm 10`, 2025-01-02 03:04 UTC" in text
    assert "**Highest throughput at p99 < 100 ms: 200 req/s** (step 2, 20 users): p50 10 ms, p99 40 ms" in text
    assert "together 600 µs, about 1,667 requests per core-second of the stack" in text
    assert "First step's hit rate (the cache as the run found it): 50.0% of answers, 50.0% of lookups" in text
    assert "After 10 s of warm-up at 10 users, the first measured step's: 90.0% of answers" in text
    assert "Not found on this machine, so no CPU figures: triton." in text
    assert "| 3 (missed) | 40 | 400 | 400 | 37.5 | 150 | 0.0% | 5.0% | 90.0% | 50.0% | 0.50 | 0.10 | 0.30 |" in text
    assert "No step met" in summary({**results, "best": None, "best_slo": None})
    assert "event writes failed" not in text


def test_the_summary_says_when_event_writes_failed_on_the_stacks_write_limit() -> None:
    steps = [step(0, 10, 20.0), step(1, 20, 40.0, failures={"event": 3}), step(2, 40, 60.0, failures={"event": 9})]
    note = write_limit_note(steps, {"RECSERVE_EVENTS_RATE_PER_S": "50"}, "/o")
    assert note is not None
    assert note.startswith("12 event writes failed, from step 2 on (/o/locust_failures.csv has their status codes).")
    assert "(RECSERVE_EVENTS_RATE_PER_S 50, RECSERVE_EVENTS_BURST its default; 429 past them)" in note
    assert write_limit_note(steps[:1], {}, "/o") is None
    assert write_limit_note([step(0, 10, 20.0, failures={"recommendation": 4})], {}, "/o") is None


def test_without_a_running_stack_it_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--stack-env", str(tmp_path / "stack.env"), "--out", str(tmp_path / "out")]) == 2
    assert "expected a running local stack described by" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
