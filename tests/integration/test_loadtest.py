"""The load test cannot rot: the locustfile runs headless for a few seconds against the test stack (real
Redis, real Triton, real HTTP), and its step recorder and SLO rule are pinned on known samples."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from export.artifacts import load_bundle
from loadtest.results import StepSamples, best_step, summarize
from loadtest.traffic import Traffic, Weighted, source_of
from tests.conftest import TEST_API_KEY, Exported

pytestmark = pytest.mark.integration
LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"


def test_locustfile_headless_against_the_stack(app_url: str, exported: Exported, tmp_path: Path) -> None:
    out = tmp_path / "steps.json"
    env = {
        **os.environ,
        "LOADTEST_BUNDLE": str(exported.bundle_path),
        "LOADTEST_STEPS": "3,3",
        "LOADTEST_STEP_S": "3",
        "LOADTEST_WARMUP_S": "0.5",
        "LOADTEST_FIXED_STEPS": "2",
        "LOADTEST_OUT": str(out),
        "LOADTEST_API_KEY": TEST_API_KEY,
    }
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", app_url, "--csv", str(tmp_path / "locust"), "--loglevel", "WARNING", "ShopperUser",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"locust exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    steps = json.loads(out.read_text())["steps"]
    assert [s["users"] for s in steps] == [3, 3]
    requests = sum(s["requests"] for s in steps)
    assert requests >= 20, f"expected at least 20 requests in two 3 s steps of 3 users at 10/s, got {requests}"
    assert all(s["failure_share"] == 0 for s in steps), [s["failures"] for s in steps]
    # The load generator's own CPU is measured apart from the service's (on a shared machine it matters).
    # (Summed over the steps: /proc counts CPU in 10 ms ticks, and one short step may round to nothing.)
    assert sum(s["load_generator_cpu_s"] for s in steps) > 0, [s["load_generator_cpu_s"] for s in steps]
    sources = {source for s in steps for source in s["sources"]}
    assert sources <= {"cache", "realtime", "precomputed", "popular"}, sources
    assert sources, "no personalised answer was recorded"

    with (tmp_path / "locust_stats.csv").open() as f:
        names = {row["Name"] for row in csv.DictReader(f)}
    assert any(name.startswith("recs [") for name in names), f"requests are not named by source: {names}"
    assert "segment" in names, names


def test_traffic_follows_the_activity_of_the_data(exported: Exported) -> None:
    traffic = Traffic.from_bundle(exported.bundle_path)
    history = load_bundle(exported.bundle_path).user_history
    assert len(history[traffic.users.values[0]]) == max(len(items) for items in history.values())
    assert "Zipf" in traffic.user_skew
    # Zipf s=1 over N users: the top 10% of users make well over a third of the requests.
    assert traffic.users.share(len(history) // 10) > 0.35
    rng = random.Random(7)
    drawn = [traffic.users.draw(rng) for _ in range(2000)]
    assert drawn.count(traffic.users.values[0]) > drawn.count(traffic.users.values[-1])


def test_weighted_rejects_mismatched_weights() -> None:
    with pytest.raises(ValueError, match="one weight per value, got 2 values and 1 weights"):
        Weighted(["a", "b"], [1.0])


def test_source_is_read_without_parsing() -> None:
    assert source_of(b'{"user_id":"1","items":[],"source":"cache","model_version":"v"}') == "cache"
    assert source_of(b"{}") == "unknown"


def test_a_step_passes_only_within_the_service_level() -> None:
    fast = StepSamples()
    for _ in range(200):
        fast.add("recs", 10.0, True, "cache")
    ok = summarize(fast, 2.0) | {"offered_rps": 100.0}
    assert ok["slo_ok"] and ok["achieved_rps"] == 100.0

    degraded = StepSamples()
    for i in range(200):
        degraded.add("recs", 10.0, True, "precomputed" if i % 10 == 0 else "realtime")
    assert not summarize(degraded, 2.0)["slo_ok"], "10% fallbacks must miss the service level"

    slow = StepSamples()
    for i in range(200):
        slow.add("recs", 150.0 if i % 20 == 0 else 10.0, True, "realtime")
    assert not summarize(slow, 2.0)["slo_ok"], "p99 over 100 ms must miss the service level"
    assert best_step([summarize(slow, 2.0), ok]) is ok
