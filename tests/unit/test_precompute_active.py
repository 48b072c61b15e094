"""`python -m export precompute --version active`: the CronJob refreshes the lists of the version Redis's
pointer names, whichever was published last, not version 1."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from export.cli_dataplane import ACTIVE, DataPlaneError, active_bundle_number, add_commands
from orchestrator.store import keys
from orchestrator.store.backend import Command
from orchestrator.store.errors import VersionError


class PointerBackend:
    """GET on a dict: the pointer and each version's metadata, as a load writes them."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    async def control(self, command: Command) -> Any:
        assert command.name == "GET", f"expected only reads, got {command}"
        return self.values.get(command.key)


def meta(version: str, triton_version: int | None) -> str:
    return json.dumps({"version": version, "dim": 32, "dtype": "fp32", "triton_version": triton_version})


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


async def test_the_active_version_names_its_bundle_number() -> None:
    name = "synthetic-v2"
    backend = PointerBackend({keys.ACTIVE_POINTER: name, keys.version_meta(name): meta(name, 2)})
    assert await active_bundle_number(backend) == 2  # type: ignore[arg-type]


async def test_a_version_without_a_number_or_no_pointer_is_refused() -> None:
    unnumbered = PointerBackend({keys.ACTIVE_POINTER: "old", keys.version_meta("old"): meta("old", None)})
    refused = r"expected the active version 'old' to record its bundle number .* pass --version N"
    with pytest.raises(DataPlaneError, match=refused):
        await active_bundle_number(unnumbered)  # type: ignore[arg-type]
    with pytest.raises(VersionError, match="no pointer"):
        await active_bundle_number(PointerBackend({}))  # type: ignore[arg-type]


def test_precompute_takes_a_number_or_active(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse("precompute", "--version", ACTIVE).version == ACTIVE
    assert parse("precompute", "--version", "3").version == 3
    assert parse("precompute").version == 1
    with pytest.raises(SystemExit):
        parse("precompute", "--version", "latest")
    assert "expected a model version number N or 'active', got 'latest'" in capsys.readouterr().err


def test_precompute_offers_every_ranker_the_job_has(capsys: pytest.CaptureFixture[str]) -> None:
    from export.precompute import RANKERS

    assert parse("precompute").ranker == "factored"
    for ranker in RANKERS:
        assert parse("precompute", "--ranker", ranker).ranker == ranker
    with pytest.raises(SystemExit):
        parse("precompute", "--ranker", "fp8")
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
