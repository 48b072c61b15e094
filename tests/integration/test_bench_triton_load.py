"""The benchmarks' Triton load generator (bench/triton_load.py) against a real tritonserver: it builds its
requests from the export alone (no service module) and Triton answers them, with and without the batcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.triton_load import MODEL, OUTPUT, ranker_server, run_load
from export import triton_config
from export.triton_config import BatchingSpec
from tests.conftest import Exported

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("batching", [BatchingSpec(), None], ids=["batcher", "no_batcher"])
def test_the_load_generator_drives_the_ranker_on_triton(
    exported: Exported, tmp_path: Path, batching: BatchingSpec | None
) -> None:
    with ranker_server(tmp_path / "triton", batching, source=exported.repo) as server:
        config = triton_config.parse((tmp_path / "triton" / MODEL / "config.pbtxt").read_text())
        assert config.HasField("dynamic_batching") == (batching is not None)
        # Saturation is what the benchmarks measure: no queue policy rejects their requests.
        assert not config.dynamic_batching.HasField("default_queue_policy")
        assert [o.name for o in config.output] == [OUTPUT]
        result = run_load(server.grpc_url, exported.bundle.dim, concurrency=2, duration_s=0.5, warmup_s=0.1)
    assert result.requests > 0 and len(result.completions_s) == result.requests
    assert result.inferences > 0 and result.executions > 0  # Triton's own statistics saw the window
