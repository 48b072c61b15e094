from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from export.cli_dataplane import add_commands
from export.plan import REFERENCE, PlanInput, plan, reference_rows


def test_raw_arithmetic_reproduces_the_reference_table():
    units = {"MB": 1e6, "GB": 1e9, "TB": 1e12}
    for row in reference_rows():
        number, unit = str(row["reference_total"]).strip("~").split()
        assert row["raw_bytes"] == pytest.approx(float(number) * units[unit], rel=0.03), row
    assert [r["raw"] for r in reference_rows()] == ["563 MB", "5.63 GB", "56.3 GB", "1.13 TB"]


def test_shard_counts_fall_in_the_reference_ranges_up_to_large():
    for row in reference_rows()[:3]:
        low, _, high = str(row["reference_shards"]).partition("-")
        assert int(low) <= int(str(row["shards"])) <= int(high or low), row


def test_fp16_halves_raw_bytes_and_measurement_replans():
    fp32 = plan(PlanInput(1000, 0, 128))
    fp16 = plan(PlanInput(1000, 0, 128, "fp16"))
    assert fp32["raw_bytes"] == 2 * 256_000 and fp16["raw_bytes"] == 256_000
    measured = plan(PlanInput(100_000_000, 10_000_000, 128), measured_bytes_per_entity=744.0)
    assert measured["measured_bytes"] == 110_000_000 * 744 and measured["shards"] == 18 and measured["shards_raw"] == 12


def test_plan_cli_prints_one_json_object(capsys: pytest.CaptureFixture[str]):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--users", "1000000", "--items", "100000", "--dim", "128", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["raw_bytes"] == 563_200_000 and out["shards"] == 1 and out["measured_bytes_per_entity"] is None


def test_plan_input_is_validated():
    with pytest.raises(ValueError, match=r"max_fill in \(0, 1\], got 8.0, 1.5"):
        plan(PlanInput(1, 1, 8, max_fill=1.5))
    assert len(REFERENCE) == 4


def test_fill_spec_spreads_ids_over_the_catalogue_it_stands_for():
    """A sample for a 1M catalogue writes ids of the 1M catalogue's widths, on which value sizes depend."""
    from export.plan import FillSpec

    sample = FillSpec(users=4, items=4, id_space=1_000_000)
    assert sample.ids(4) == ["1", "250001", "500001", "750001"]
    assert sample.item_id_space == 1_000_000
    assert FillSpec(users=3, items=5).ids(3) == ["1", "2", "3"] and FillSpec(users=3, items=5).item_id_space == 5


def test_fill_spec_history_lengths_follow_the_synthetic_generator():
    from export.plan import FillSpec

    spec = FillSpec(users=10, items=100)
    lengths = spec.history_lengths(np.random.default_rng(0), 20_000)
    assert lengths.min() >= spec.history_min and lengths.max() <= 50  # at most half the catalogue
    big = FillSpec(users=10, items=1_000_000).history_lengths(np.random.default_rng(0), 20_000)
    # lognormal(log 100, 0.6) clipped at 20: mean about 100 x exp(0.18) = 120.
    assert 110 < big.mean() < 130


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"users": 0, "items": 10}, r"users >= 1, items >= 2 and dim >= 1 required, got 0, 10, 128"),
        ({"users": 10, "items": 10, "dtype": "int8"}, r"dtype must be one of \['fp16', 'fp32'\], got 'int8'"),
        ({"users": 10, "items": 10, "cached_users": 11}, r"cached_users must lie in 0..users \(10\), got 11"),
        ({"users": 10, "items": 10, "chunk": 0}, r"chunk must be an integer >= 1, got 0"),
        ({"users": 10, "items": 20, "id_space": 15}, r"id_space must be 0 or >= users and items \(20\), got 15"),
    ],
)
def test_fill_spec_states_its_rules(spec, match):
    from export.plan import FillSpec

    with pytest.raises(ValueError, match=match):
        FillSpec(**spec).validate()
