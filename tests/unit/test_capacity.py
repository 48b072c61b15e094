"""The capacity plan: reproduces the reference plan from the figures it implies, reads measurements
with their sources, prefers the memory planner's measured bytes, and states its rules on bad input."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from export import capacity
from export.capacity import CapacityInputError, Load, Measurement, Policy, plan, reference_case
from export.cli_capacity import add_commands

REPO = Path(__file__).resolve().parents[2]


def test_reproduces_the_reference_plan() -> None:
    load, measurements, policy = reference_case()
    p = plan(load, measurements, policy)
    assert (p.orchestrator["servers"], p.orchestrator["cores_per_server"]) == (20, 8)
    assert p.triton["t4_gpus"] == 8
    assert (p.redis["shards"], p.redis["node_memory_gb"]) == (16, 32.0)
    assert (p.faiss["replicas"], p.faiss["replica_memory_gb"]) == (4, 64.0)
    assert p.faiss["placement"] == "dedicated"
    assert p.latency["fits"]
    assert p.provisional == []


def test_the_committed_measurements_load_and_name_their_sources() -> None:
    measurements = capacity.load_measurements(REPO / "docs" / "measurements.json")
    assert set(capacity.REQUIRED_MEASUREMENTS) <= set(measurements)
    assert all(m.source.strip() for m in measurements.values())
    # The T4 factor is an assumption until someone measures a T4; the file must say so.
    assert "assumption" in measurements["t4_speedup_over_cpu_instance"].source


def _ours() -> dict[str, Measurement]:
    """Pinned inputs (the first, provisional figures): the arithmetic below is checked against them, so
    a benchmark rewriting docs/measurements.json cannot break these tests."""
    return capacity.load_measurements(Path(__file__).with_name("capacity_measurements.json"))


def test_the_live_measurements_load_and_plan() -> None:
    live = capacity.load_measurements(REPO / "docs" / "measurements.json")
    p = plan(Load(users=100_000_000, qps=50_000, p99_ms=100, cache_hit_rate=0.9), live)
    assert p.orchestrator["pods"] >= 1 and p.triton["t4_gpus"] >= 2 and p.redis["shards"] >= 3


def test_our_plan_for_the_reference_load() -> None:
    p = plan(Load(users=100_000_000, qps=50_000, p99_ms=100, cache_hit_rate=0.9), _ours())
    # Orchestrator: 50K x (0.9/1200 + 0.1/150) busy cores / 0.6 = 118.1 -> 119 one-core pods.
    assert p.orchestrator["pods"] == 119 and p.orchestrator["servers"] == 15
    # 5K misses/s x 200 candidates = 1M rows/s over 50K x 8 rows/s per T4 at 70% -> 4 T4s.
    assert p.triton["rows_per_s"] == 1_000_000 and p.triton["t4_gpus"] == 4
    assert p.triton["t4_basis"].startswith("assumption")
    # The flat index (26 GB) does not fit a pod; PQ codes (3.6 GB) do, so FAISS stays in process.
    assert p.faiss["placement"] == "in-process" and p.faiss["index"] == "IVF-HNSW,PQ"
    assert p.faiss["replicas"] == p.orchestrator["pods"]
    assert "raw" in p.redis["basis"], "no benchmark yet: raw arithmetic x the stated overhead"
    # 150M entities x (768 + 100) + 100M x (500 list + 413 seen set) + 20M cached x 600 = 233.5 GB over 24 GB.
    assert p.redis["data_gb"] == 233.5 and p.redis["shards"] == 10
    assert "t4_speedup_over_cpu_instance" in p.provisional


def test_cache_hit_rate_drives_pods_and_gpus() -> None:
    low = plan(Load(users=10**6, qps=10_000, p99_ms=100, cache_hit_rate=0.5), _ours())
    high = plan(Load(users=10**6, qps=10_000, p99_ms=100, cache_hit_rate=0.95), _ours())
    assert high.orchestrator["cores"] < low.orchestrator["cores"]
    assert high.triton["rows_per_s"] == pytest.approx(low.triton["rows_per_s"] / 10)


def test_min_replicas_hold_at_tiny_load() -> None:
    p = plan(Load(users=100, qps=1, p99_ms=100, cache_hit_rate=0.9, items=100), _ours())
    assert p.orchestrator["pods"] == 2 and p.triton["t4_gpus"] == 2
    assert p.redis["shards"] == 3, "the smallest Redis Cluster has 3 masters"
    assert p.faiss["index"] == "IVF,Flat"


def test_planner_measurement_supersedes_raw_arithmetic(tmp_path: Path) -> None:
    measured = tmp_path / "plan_measured.json"
    measured.write_text(json.dumps({"raw_bytes": 1, "measured_bytes_per_entity": {"user": 700, "item": 650}}))
    per_entity = capacity.planner_bytes_per_entity(measured)
    assert per_entity == 700
    load = Load(users=10**8, qps=50_000, p99_ms=100, cache_hit_rate=0.9)
    p = plan(load, _ours(), measured_bytes_per_entity=per_entity)
    assert "memory planner" in p.redis["basis"]
    assert p.redis["bytes_per_entity"] == 700 + 100
    assert capacity.planner_bytes_per_entity(tmp_path / "absent.json") is None


def test_a_benchmarked_embedding_figure_is_used_as_measured() -> None:
    ours = _ours()
    ours["redis_bytes_per_embedding_128_fp32"] = Measurement(600, "bytes", "bench: redis memory run", False)
    p = plan(Load(users=10**6, qps=1_000, p99_ms=100, cache_hit_rate=0.9), ours)
    assert p.redis["basis"] == "measured: bench: redis memory run"
    assert p.redis["bytes_per_entity"] == 700


def test_a_measured_t4_replaces_the_assumption() -> None:
    ours = _ours()
    ours[capacity.T4_MEASURED_KEY] = Measurement(1_000_000, "rows/s", "bench: T4", False)
    p = plan(Load(users=10**8, qps=50_000, p99_ms=100, cache_hit_rate=0.9), ours)
    assert p.triton["t4_basis"].startswith("measured") and p.triton["t4_gpus"] == 2


def test_latency_budget_is_checked() -> None:
    p = plan(Load(users=10**6, qps=1_000, p99_ms=30, cache_hit_rate=0.9), _ours())
    assert not p.latency["fits"] and p.latency["headroom_ms"] == -15.0


@pytest.mark.parametrize(
    ("load", "match"),
    [
        (Load(users=0, qps=1, p99_ms=1, cache_hit_rate=0.5), r"users: expected an integer >= 1, but found 0"),
        (Load(users=1, qps=0, p99_ms=1, cache_hit_rate=0.5), r"qps: expected > 0, but found 0"),
        (
            Load(users=1, qps=1, p99_ms=1, cache_hit_rate=1.0),
            r"cache_hit_rate: expected a fraction in \[0, 1\)",
        ),
    ],
)
def test_bad_load_states_the_rule(load: Load, match: str) -> None:
    with pytest.raises(CapacityInputError, match=match):
        plan(load, _ours())


def test_bad_policy_states_the_rule() -> None:
    with pytest.raises(CapacityInputError, match=r"cpu_target_utilization: expected a fraction in \(0, 1\]"):
        plan(Load(users=1, qps=1, p99_ms=1, cache_hit_rate=0.5), _ours(), Policy(cpu_target_utilization=0))


def test_measurement_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    with pytest.raises(CapacityInputError, match="expected a measurement file"):
        capacity.load_measurements(path)
    path.write_text(json.dumps({"measurements": {"x": {"value": 1, "unit": "u"}}}))
    with pytest.raises(CapacityInputError, match=r"x: expected value, unit and source, but found \"no \['source'\]\""):
        capacity.load_measurements(path)
    path.write_text(json.dumps({"measurements": {"x": {"value": 1, "unit": "u", "source": "s"}}}))
    with pytest.raises(CapacityInputError, match=r"missing"):
        capacity.load_measurements(path)


def test_bad_planner_file_states_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "plan_measured.json"
    path.write_text(json.dumps({"measured_bytes_per_entity": "lots"}))
    with pytest.raises(CapacityInputError, match="measured_bytes_per_entity: expected a number > 0"):
        capacity.planner_bytes_per_entity(path)


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [
        "capacity",
        "--users",
        "1000000",
        "--qps",
        "2000",
        "--p99-ms",
        "100",
        "--cache-hit-rate",
        "0.8",
        "--plan-measured",
        str(tmp_path / "absent.json"),
        "--json",
    ]
    assert _run_cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["load"]["users"] == 1_000_000 and out["orchestrator"]["pods"] >= 2
    assert set(out) >= {"orchestrator", "triton", "redis", "faiss", "latency", "sources", "provisional"}


def test_cli_reference_and_a_budget_miss(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["capacity", "--reference"]) == 0
    assert "20 servers x 8 CPU" in capsys.readouterr().out
    assert _run_cli(["capacity", "--p99-ms", "10", "--plan-measured", "/nonexistent"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_policy_replace_keeps_validation() -> None:
    with pytest.raises(CapacityInputError, match=r"redis_raw_overhead: expected >= 1\.0"):
        plan(
            Load(users=1, qps=1, p99_ms=1, cache_hit_rate=0.5),
            _ours(),
            replace(Policy(), redis_raw_overhead=0.5),
        )


def test_redis_counts_every_key_kind() -> None:
    """Embeddings and feature rows of users and items, per user a seen set and a pre-computed list, per
    cached user its cached contexts: each kind from its own measured figure, none left out."""
    ours = _ours()
    figures = {
        "redis_bytes_per_embedding_128_fp16": 430.0,
        "redis_bytes_per_feature_row": 120.0,
        "redis_bytes_per_seen_set": 410.0,
        "redis_bytes_per_precomputed_list": 1_170.0,
        "redis_bytes_per_cache_entry": 3_340.0,
    }
    for key, value in figures.items():
        ours[key] = Measurement(value, "bytes", "bench: redis run", False)
    load = Load(users=1_000_000, qps=1_000, p99_ms=100, cache_hit_rate=0.9, items=2_000_000, embedding_dtype="fp16")
    policy = Policy(cache_user_fraction=0.2, cache_contexts_per_user=1.0)
    by_kind, entity, basis = capacity.redis_data_bytes(load, ours, policy)
    assert by_kind == {
        "embeddings": 3_000_000 * 430.0,
        "feature_rows": 3_000_000 * 120.0,
        "seen_sets": 1_000_000 * 410.0,
        "precomputed_lists": 1_000_000 * 1_170.0,
        "cache_entries": 200_000 * 3_340.0,
    }
    assert entity == 550.0 and basis == "measured: bench: redis run"
    p = plan(load, ours, policy)
    assert p.redis["data_gb"] == round(sum(by_kind.values()) / 1e9, 1) == 3.9
    assert p.redis["data_gb_by_kind"]["seen_sets"] == 0.41
    # Two cached contexts per cached user double the cache's share and nothing else.
    doubled, _, _ = capacity.redis_data_bytes(load, ours, replace(policy, cache_contexts_per_user=2.0))
    assert doubled["cache_entries"] == 2 * by_kind["cache_entries"]
    assert {k: v for k, v in doubled.items() if k != "cache_entries"} == {
        k: v for k, v in by_kind.items() if k != "cache_entries"
    }


def test_embedding_bytes_follow_the_stored_dtype() -> None:
    ours = _ours()
    ours["redis_bytes_per_embedding_128_fp32"] = Measurement(744, "bytes", "bench fp32", False)
    ours["redis_bytes_per_embedding_128_fp16"] = Measurement(424, "bytes", "bench fp16", False)
    fp32 = Load(users=10, qps=1, p99_ms=100, cache_hit_rate=0.9, embedding_dim=256)
    assert capacity.embedding_bytes(fp32, ours, Policy()) == (1488, "measured: bench fp32")
    fp16 = replace(fp32, embedding_dtype="fp16")
    assert capacity.embedding_bytes(fp16, ours, Policy()) == (848, "measured: bench fp16")
    # No fp16 figure measured: raw arithmetic at 2 bytes per value, said so.
    del ours["redis_bytes_per_embedding_128_fp16"]
    raw, basis = capacity.embedding_bytes(fp16, ours, Policy(redis_raw_overhead=1.5))
    assert raw == 256 * 2 * 1.5 and basis.startswith("raw 256 x 2 B x 1.5")


def test_bad_dtype_and_cache_policy_state_the_rule() -> None:
    load = Load(users=1, qps=1, p99_ms=1, cache_hit_rate=0.5, embedding_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(CapacityInputError, match=r"embedding_dtype: expected one of \['fp16', 'fp32'\]"):
        plan(load, _ours())
    with pytest.raises(CapacityInputError, match=r"cache_user_fraction: expected a fraction in \[0, 1\]"):
        plan(Load(users=1, qps=1, p99_ms=1, cache_hit_rate=0.5), _ours(), Policy(cache_user_fraction=1.5))
