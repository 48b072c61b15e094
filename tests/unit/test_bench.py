"""The benchmark machinery, not its speed: section blocks, measurements.json, percentiles and ratios."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from bench.batching import Sweep, recommend
from bench.ranker import pinned_to, two_cores
from bench.runner import (
    BenchContext,
    Machine,
    Measured,
    SectionResult,
    format_ratio,
    markdown_table,
    median,
    percentile,
    ratio,
    replace_section,
    replace_section_text,
    run_sections,
    update_measurements,
)
from bench.triton_load import LoadResult, Point, noise, windowed_rates


def test_replace_section_appends_a_missing_section_with_markers(tmp_path: Path) -> None:
    path = tmp_path / "B.md"
    replace_section(path, "ranker", "## Ranker\n\nfast")
    assert path.read_text() == "<!-- section:ranker -->\n## Ranker\n\nfast\n<!-- /section:ranker -->\n"
    replace_section(path, "batching", "## Batching")
    text = path.read_text()
    assert text.index("section:ranker") < text.index("section:batching")
    assert text.endswith("<!-- /section:batching -->\n")


def test_replace_section_replaces_only_its_own_block(tmp_path: Path) -> None:
    path = tmp_path / "B.md"
    for name in ("a", "b", "c"):
        replace_section(path, name, f"old {name}")
    replace_section(path, "b", "new b\nsecond line")
    text = path.read_text()
    assert "old b" not in text
    assert "<!-- section:b -->\nnew b\nsecond line\n<!-- /section:b -->" in text
    assert "old a" in text and "old c" in text
    assert text.index("old a") < text.index("new b") < text.index("old c")  # order kept
    replace_section(path, "b", "new b\nsecond line")
    assert path.read_text() == text  # idempotent


def test_text_outside_the_markers_is_kept() -> None:
    text = "intro by hand\n\n<!-- section:x -->\nold\n<!-- /section:x -->\n\nfooter\n"
    assert (
        replace_section_text(text, "x", "new")
        == "intro by hand\n\n<!-- section:x -->\nnew\n<!-- /section:x -->\n\nfooter\n"
    )


def test_the_header_goes_first_and_replaces_a_bare_title() -> None:
    text = "# Benchmarks\n\n<!-- section:dataplane -->\nredis\n<!-- /section:dataplane -->\n"
    out = replace_section_text(text, "header", "# Benchmarks\n\nabout")
    assert out.startswith("<!-- section:header -->\n# Benchmarks\n\nabout\n<!-- /section:header -->\n\n")
    assert out.count("# Benchmarks") == 1
    assert "redis" in out


def test_an_unclosed_section_is_reported_not_overwritten() -> None:
    with pytest.raises(ValueError, match=r"section 'x' opens with <!-- section:x --> but has no closing"):
        replace_section_text("<!-- section:x -->\nhalf", "x", "new")


def test_section_names_are_checked() -> None:
    with pytest.raises(ValueError, match="section name must match"):
        replace_section_text("", "bad name -->", "x")


def test_percentile_median_and_ratio() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert median(values) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert ratio(30.0, 10.0) == 3.0
    assert format_ratio(ratio(1.0, 3.0)) == "0.33x"


def test_percentile_and_ratio_refuse_what_would_be_a_silent_wrong_figure() -> None:
    with pytest.raises(ValueError, match="empty sample"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"q must lie in 0..100, got 101"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match=r"positive denominator, got 0.0 \(numerator 5.0\)"):
        ratio(5.0, 0.0)


def test_markdown_table_checks_its_shape() -> None:
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---:|\n| 1 | 2 |"
    with pytest.raises(ValueError, match="a row has 1 cells but the header has 2"):
        markdown_table(["a", "b"], [[1]])


def test_windowed_rates_count_completions_per_window() -> None:
    completions = (0.1, 0.2, 0.6, 0.7, 0.8, 1.4)
    assert windowed_rates(completions, 1.5, 0.5, weight=200) == [800.0, 1200.0, 400.0]


def test_update_measurements_sets_measured_keys_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(
        json.dumps(
            {
                "about": "kept",
                "measurements": {
                    "measured": {"value": 1, "unit": "u", "source": "guess", "provisional": True},
                    "untouched": {"value": 2, "unit": "v", "source": "guess", "provisional": True},
                },
            }
        )
    )
    update_measurements(path, {"measured": Measured(42.0, "rows/s"), "new": Measured(3.0, "x")}, "cmd (date)")
    raw = json.loads(path.read_text())
    assert raw["about"] == "kept"
    assert raw["measurements"]["measured"] == {"value": 42.0, "unit": "rows/s", "source": "cmd (date)"}
    assert raw["measurements"]["untouched"]["provisional"] is True
    assert raw["measurements"]["new"]["source"] == "cmd (date)"


def test_run_sections_writes_what_ran_and_keeps_a_failed_sections_block(tmp_path: Path) -> None:
    md, measurements = tmp_path / "B.md", tmp_path / "m.json"
    replace_section(md, "b", "old b")
    ctx = BenchContext("python -m bench --only a b", "2026-01-01", Machine(2, "test CPU"), work_dir=tmp_path)

    def boom(ctx: BenchContext) -> SectionResult:
        raise RuntimeError("broken")

    sections = {"a": lambda c: SectionResult(f"## A\n\n{c.provenance()}", {"k": Measured(1.0, "u")}), "b": boom}
    assert run_sections(["a", "b"], ctx, md, measurements, sections) == ["b"]
    text = md.read_text()
    assert text.startswith("<!-- section:header -->")
    assert "Command: `python -m bench --only a b`" in text and "2 cores (test CPU)" in text
    assert "old b" in text
    assert json.loads(measurements.read_text())["measurements"]["k"]["source"] == ctx.source()


def _run(rows_per_s: float, p99_ms: float) -> LoadResult:
    """A 1 s run whose completions are spread evenly: ``rows_per_s / 200`` requests of 200 rows."""
    n = int(rows_per_s / 200)
    return LoadResult(8, 200, 1.0, (p99_ms / 1000,) * n, tuple(i / n for i in range(n)), n * 200, n)


def test_a_point_takes_medians_over_rounds_and_reports_their_spread() -> None:
    point = Point.of([_run(4000, 10), _run(6000, 30), _run(5000, 20)])
    assert point.rows_per_s == pytest.approx(5000)
    assert point.p99_ms == pytest.approx(20)
    assert point.rows_per_execution == 200
    assert point.spread == pytest.approx(0.4)  # (6000 - 4000) / 5000
    assert noise([point, Point.of([_run(4000, 10)])]) == pytest.approx(0.4)  # one round: no spread to count


def _point(rows_per_s: float, p50_ms: float) -> Point:
    return Point(rows_per_s, p50_ms, p50_ms * 2, 200, 0.02, 3)


def test_recommend_takes_the_smallest_delay_that_ties_the_best_throughput() -> None:
    # 10 ms is 3% faster under load: a tie, so the smallest delay wins and its latency cost is named.
    results: Sweep = {
        d: {c: _point(50_000 * (1.03 if d == 10 and c >= 8 else 1.0), 5 + d) for c in (1, 8, 16, 32)}
        for d in (0, 1, 5, 10)
    }
    results[None] = {c: _point(25_000, 5) for c in (1, 8, 16, 32)}
    chosen = recommend(results)
    assert chosen.delay_ms == 0
    assert "5.0 ms at 0 ms" in chosen.why and "15.0 ms at 10 ms" in chosen.why
    assert "2.00x the rows/s" in chosen.why


def test_recommend_takes_a_longer_delay_when_it_clearly_pays() -> None:
    results: Sweep = {
        d: {c: _point(50_000 * (1.5 if d >= 5 and c >= 8 else 1.0), 5 + d) for c in (1, 8, 32)} for d in (0, 1, 5, 10)
    }
    assert recommend(results).delay_ms == 5


@pytest.mark.skipif(two_cores() is None, reason="needs two cores and Linux sched_setaffinity")
def test_pinning_moves_every_thread_and_restores_them() -> None:
    cores = two_cores()
    assert cores is not None
    before = os.sched_getaffinity(0)
    seen: dict[str, set[int]] = {}
    go, done = threading.Event(), threading.Event()

    def worker() -> None:  # started before pinning: must be moved too
        go.wait()
        seen["worker"] = os.sched_getaffinity(0)
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    with pinned_to({cores[1]}):
        seen["main"] = os.sched_getaffinity(0)
        go.set()
        done.wait(5)
    thread.join()
    assert seen == {"main": {cores[1]}, "worker": {cores[1]}}
    assert os.sched_getaffinity(0) == before


def test_redis_section_turns_the_sample_into_the_plans_inputs_and_estimate() -> None:
    """Per-key figures are used_memory deltas per key (embeddings and feature rows: mean of user and item);
    the estimate is the capacity plan's own arithmetic on them, counting every kind."""
    from bench.redis_scale import per_unit_figures, plan_before, plan_estimate
    from export.plan import FillSpec, KindMeasurement, ScaleMeasurement

    def sample(per_key: dict[str, float]) -> ScaleMeasurement:
        kinds = {k: KindMeasurement(100, int(v * 100), v - 10, 0.1) for k, v in per_key.items()}
        return ScaleMeasurement(FillSpec(100, 100), 1_000, 0, kinds, 120.0, "7.0")

    fp16 = sample(
        {
            "user_embedding": 420,
            "item_embedding": 440,
            "user_features": 110,
            "item_features": 130,
            "seen": 600,
            "precomputed": 1200,
            "cache_entry": 3300,
        }
    )
    fp32 = sample({"user_embedding": 740, "item_embedding": 760})
    figures = per_unit_figures(fp16, fp32)
    assert figures == {
        "redis_bytes_per_embedding_128_fp16": 430,
        "redis_bytes_per_embedding_128_fp32": 750,
        "redis_bytes_per_feature_row": 120,
        "redis_bytes_per_seen_set": 600,
        "redis_bytes_per_precomputed_list": 1200,
        "redis_bytes_per_cache_entry": 3300,
    }
    estimate = plan_estimate(figures, 1000, 2000, "test run")
    assert estimate == {
        "embeddings": 3000 * 430,
        "feature_rows": 3000 * 120,
        "seen_sets": 1000 * 600,
        "precomputed_lists": 1000 * 1200,
        "cache_entries": 200 * 3300,  # the plan's 20% of users with a cached list
    }
    # The baseline plan: no seen sets, a 600 B cache entry, the per-key figures of 2026-11-29.
    assert plan_before(1000, 2000, 0.2) == 3000 * (424 + 88) + 1000 * 952 + 200 * 600
