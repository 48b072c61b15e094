from __future__ import annotations

import argparse
import json

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
