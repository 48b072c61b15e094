"""What the ranker and batching sections share: the Triton under test (``ranker_onnx`` alone on the cpu
profile), the small closed-loop load generator over gRPC, in-process ONNX Runtime sessions configured as
the cpu profile configures them, and the default export they measure.

No perf_analyzer wheel exists for this platform, hence the load generator: closed-loop clients on one
``tritonclient`` gRPC aio channel, each sending a 200-row request (a request's candidates) as soon as its
previous answer arrives. Requests are built here from the exported model's tensors (``export``), and go to
Triton over gRPC: nothing of the service is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import np_to_triton_dtype

from bench.runner import median, percentile
from export import triton_config
from export.artifacts import MODEL_REPOSITORY, artifacts_dir
from export.model_export import example_inputs
from export.model_repository import render_profile_repository
from export.triton_config import BatchingSpec, ranker_models
from stack.triton_launcher import TritonServer

log = logging.getLogger(__name__)

DATASET = "synthetic"
MODELS = ("ranker_onnx", "ranker_torchscript")
MODEL = "ranker_onnx"
ROWS_PER_REQUEST = 200
# The score tensor's name, as the export names it in config.pbtxt and the ONNX graph.
OUTPUT = next(m.output_name for m in ranker_models() if m.name == MODEL)


def ensure_artifacts(repo: Path = MODEL_REPOSITORY) -> None:
    """The default export's artifacts; trains and exports them (minutes) when missing."""
    missing = [m for m in MODELS if not (repo / m / "1" / "manifest.json").is_file()]
    if missing or not (artifacts_dir(DATASET) / "manifest.json").is_file():
        from export.pipeline import run_all

        log.info("bench: no default export (%s missing): running the synthetic pipeline first", missing or DATASET)
        run_all(DATASET)


# --- in-process ONNX Runtime -------------------------------------------------------------------------


def onnx_session(path: Path, threads: int) -> ort.InferenceSession:
    """Configured as the cpu profile's Python backend configures its session."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --- the Triton under test -----------------------------------------------------------------------


def embedding_dim(repo: Path = MODEL_REPOSITORY) -> int:
    return int(json.loads((repo / MODEL / "1" / "manifest.json").read_text())["embedding_dim"])


def no_batching(max_batch_size: int = 1024) -> BatchingSpec:
    """The naive design's "dynamic batching off": no queue delay, no preferred sizes."""
    return BatchingSpec(max_batch_size=max_batch_size, preferred_batch_sizes=(), max_queue_delay_microseconds=0)


@contextlib.contextmanager
def ranker_server(
    dest: Path,
    batching: BatchingSpec | None,
    instance_count: int = 1,
    cpu_threads: int = 1,
    source: Path = MODEL_REPOSITORY,
) -> Iterator[TritonServer]:
    """A tritonserver serving only ``ranker_onnx`` (cpu profile) from ``source``'s model file, rendered
    into ``dest``: one model keeps start-up short and leaves the cores to the model under test.

    ``batching=None`` drops the ``dynamic_batching`` block: every request is one execution. That is the
    baseline the batcher is measured against, since at 0 ms delay it still merges what queued meanwhile.
    """
    # Without the shipped queue policy (export/triton_config.py): closed-loop clients at saturation (up to 64
    # on 2 cores) queue past its 40 ms timeout, and the load generator measures throughput, not shedding.
    spec = dataclasses.replace(batching or no_batching(), queue_timeout_microseconds=0, max_queue_size=0)
    onnx = next(m for m in ranker_models(embedding_dim(source), spec) if m.name == MODEL)
    model = dataclasses.replace(onnx, instance_count=instance_count, cpu_threads=cpu_threads)
    repo = render_profile_repository("cpu", dest, source, models=(model,))
    if batching is None:
        config_path = repo / MODEL / "config.pbtxt"
        config = triton_config.parse(config_path.read_text())
        config.ClearField("dynamic_batching")
        config_path.write_text(triton_config.render(config))
    with TritonServer(repo, log_path=dest.with_suffix(".log")) as server:
        yield server


# --- the load generator --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    """One closed-loop run: per-request latencies and completion times within the measured window."""

    concurrency: int
    rows_per_request: int
    duration_s: float
    latencies_s: tuple[float, ...]
    completions_s: tuple[float, ...]  # seconds since the window opened
    inferences: int  # rows Triton executed in the window (its statistics)
    executions: int  # model executions (batches) in the window

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def mean_rows_per_s(self) -> float:
        return self.requests * self.rows_per_request / self.duration_s

    @property
    def median_rows_per_s(self) -> float:
        """Median over 0.5 s windows: one stall on the shared machine does not drag the figure."""
        return median(windowed_rates(self.completions_s, self.duration_s, 0.5, self.rows_per_request))

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_s, 50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_s, 99) * 1000

    @property
    def rows_per_execution(self) -> float:
        return self.inferences / self.executions if self.executions else float("nan")


def windowed_rates(completions_s: tuple[float, ...], duration_s: float, window_s: float, weight: int) -> list[float]:
    """Events per second (times ``weight``) in each whole window of ``window_s`` over ``duration_s``."""
    n = max(1, int(duration_s // window_s))
    counts = np.histogram(np.asarray(completions_s), bins=n, range=(0.0, n * window_s))[0]
    return [float(c) * weight / window_s for c in counts]


def grpc_inputs(tensors: dict[str, np.ndarray]) -> list[grpcaio.InferInput]:
    """Named numpy tensors as Triton gRPC inputs (dtype names from tritonclient's own table)."""
    inputs = []
    for name, value in tensors.items():
        tensor = grpcaio.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


async def _stats(client: grpcaio.InferenceServerClient) -> tuple[int, int]:
    # Every version's entry: with several versions in the repository an unversioned request runs on the
    # newest, not necessarily version 1.
    entries = (await client.get_inference_statistics(MODEL, as_json=True))["model_stats"]
    return (
        sum(int(e.get("inference_count", 0)) for e in entries),
        sum(int(e.get("execution_count", 0)) for e in entries),
    )


async def drive(
    url: str, dim: int, concurrency: int, duration_s: float, warmup_s: float, rows: int = ROWS_PER_REQUEST
) -> LoadResult:
    """``concurrency`` closed-loop clients for ``warmup_s`` (discarded), then ``duration_s`` measured."""
    client = grpcaio.InferenceServerClient(url)
    # Built once: serialising fresh tensors per call would measure numpy, not the server.
    inputs = grpc_inputs(example_inputs(dim, rows, seed=rows))
    outputs = [grpcaio.InferRequestedOutput(OUTPUT)]
    try:
        first = await client.infer(MODEL, inputs, outputs=outputs)
        shape = first.as_numpy(OUTPUT).shape
        if shape != (rows, 1):
            raise RuntimeError(f"{MODEL} answered a {rows}-row request with shape {shape}, expected ({rows}, 1)")

        async def phase(seconds: float) -> tuple[float, list[float], list[float]]:
            opened = time.perf_counter()
            deadline = opened + seconds
            latencies: list[float] = []
            completions: list[float] = []

            async def client_loop() -> None:
                while (sent := time.perf_counter()) < deadline:
                    await client.infer(MODEL, inputs, outputs=outputs)
                    done = time.perf_counter()
                    latencies.append(done - sent)
                    completions.append(done - opened)

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
            # Requests sent before the deadline finish after it: count the window until the last one.
            return time.perf_counter() - opened, latencies, completions

        if warmup_s > 0:
            await phase(warmup_s)
        inferences0, executions0 = await _stats(client)
        elapsed, latencies, completions = await phase(duration_s)
        inferences1, executions1 = await _stats(client)
    finally:
        await client.close()
    return LoadResult(
        concurrency,
        rows,
        elapsed,
        tuple(latencies),
        tuple(completions),
        inferences1 - inferences0,
        executions1 - executions0,
    )


def run_load(url: str, dim: int, concurrency: int, duration_s: float, warmup_s: float = 0.5) -> LoadResult:
    return asyncio.run(drive(url, dim, concurrency, duration_s, warmup_s))


@dataclass(frozen=True)
class Point:
    """One (setting, concurrency) point over rounds: medians of the rounds' figures, and their spread."""

    rows_per_s: float
    p50_ms: float
    p99_ms: float
    rows_per_execution: float
    spread: float  # (max - min) / median of the rounds' rows/s: this point's run-to-run noise
    rounds: int

    @classmethod
    def of(cls, runs: list[LoadResult]) -> Point:
        rates = [r.median_rows_per_s for r in runs]
        mid = median(rates)
        return cls(
            mid,
            median([r.p50_ms for r in runs]),
            median([r.p99_ms for r in runs]),
            median([r.rows_per_execution for r in runs]),
            (max(rates) - min(rates)) / mid if mid > 0 else float("nan"),
            len(runs),
        )


def noise(points: list[Point]) -> float:
    """The median spread between rounds over all points: what a difference must exceed to mean something."""
    spreads = [p.spread for p in points if p.rounds > 1 and p.spread == p.spread]
    return median(spreads) if spreads else float("nan")
