"""Section ``ranker``: export time and model sizes,
ONNX Runtime CPU latency by batch size, ranker rows/s through Triton (cpu profile) at 1, 8 and 32
clients with dynamic batching on and off, instance count 1 vs 2, and Triton against in-process ONNX
Runtime on the same cores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench.runner import (
    BenchContext,
    Measured,
    SectionResult,
    format_rate,
    format_ratio,
    load_average,
    markdown_table,
    median,
    percentile,
    ratio,
)
from bench.triton_load import (
    DATASET,
    MODEL,
    MODELS,
    ROWS_PER_REQUEST,
    LoadResult,
    Point,
    embedding_dim,
    ensure_artifacts,
    no_batching,
    noise,
    onnx_session,
    ranker_server,
    run_load,
    windowed_rates,
)
from export.artifacts import MODEL_REPOSITORY, artifacts_dir
from export.model_export import example_inputs
from export.triton_config import BatchingSpec
from stack.triton_launcher import TritonServer

log = logging.getLogger(__name__)

LATENCY_BATCHES: tuple[int, ...] = (1, 8, 32, 128, 256, 1024)
CLIENTS: tuple[int, ...] = (1, 8, 32)
HOP_CLIENTS = 32


# --- in-process ONNX Runtime -----------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyRow:
    batch: int
    runs: int
    p50_ms: float
    p99_ms: float

    @property
    def rows_per_s(self) -> float:
        return self.batch / (self.p50_ms / 1000)


def latency_by_batch(session: ort.InferenceSession, dim: int, budget_s: float, min_runs: int = 30) -> list[LatencyRow]:
    rows = []
    for batch in LATENCY_BATCHES:
        tensors = example_inputs(dim, batch, seed=batch)
        for _ in range(5):
            session.run(None, tensors)  # first runs allocate arenas
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < min_runs or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            session.run(None, tensors)
            times.append(time.perf_counter() - t0)
        rows.append(LatencyRow(batch, len(times), percentile(times, 50) * 1000, percentile(times, 99) * 1000))
    return rows


@dataclass(frozen=True)
class InProcess:
    label: str
    rows_per_s: float  # median over 0.5 s windows


def in_process_rate(
    make_session: Callable[[], ort.InferenceSession], workers: int, dim: int, duration_s: float
) -> float:
    """Rows/s of ``workers`` threads each scoring 200-row batches back to back (ORT releases the GIL)."""
    tensors = example_inputs(dim, ROWS_PER_REQUEST, seed=ROWS_PER_REQUEST)
    sessions = [make_session() for _ in range(workers)]
    for session in sessions:
        session.run(None, tensors)
    completions: list[float] = []
    lock = threading.Lock()
    opened = time.perf_counter()
    deadline = opened + duration_s

    def loop(session: ort.InferenceSession) -> None:
        while time.perf_counter() < deadline:
            session.run(None, tensors)
            with lock:
                completions.append(time.perf_counter() - opened)

    threads = [threading.Thread(target=loop, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return median(windowed_rates(tuple(completions), duration_s, 0.5, ROWS_PER_REQUEST))


@contextlib.contextmanager
def pinned_to(cpus: set[int]) -> Iterator[None]:
    """Every thread of this process on ``cpus`` while inside; processes started meanwhile inherit it.

    All threads, not only the caller: gRPC's and ONNX Runtime's threads started earlier would
    otherwise keep running on the other core and blur which core did the work.
    """
    before = os.sched_getaffinity(0)

    def apply(target: set[int]) -> None:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), target)

    apply(cpus)
    try:
        yield
    finally:
        apply(before)


def two_cores() -> tuple[int, int] | None:
    """Two cores this process may use, or None (then the pinned comparison is skipped, and says so)."""
    if not hasattr(os, "sched_setaffinity") or not Path("/proc/self/task").is_dir():
        return None
    cores = sorted(os.sched_getaffinity(0))
    return (cores[0], cores[1]) if len(cores) >= 2 else None


@dataclass(frozen=True)
class PinnedHop:
    """In-process ONNX Runtime and Triton (server and its stubs) each confined to the same one core,
    the Triton load generator on another: the hop's cost on the cores that serve, without the client's."""

    serving_core: int
    client_core: int
    in_process: list[float]  # rows/s per round
    triton: list[LoadResult]

    @property
    def ratio(self) -> float:
        return ratio(median([r.median_rows_per_s for r in self.triton]), median(self.in_process))


def measure_pinned_hop(
    ctx: BenchContext, onnx_path: Path, dim: int, point_s: float, warmup_s: float, rounds: int
) -> PinnedHop | None:
    cores = two_cores()
    if cores is None:
        return None
    serving, client = cores
    in_process: list[float] = []
    triton: list[LoadResult] = []
    with pinned_to({serving}), ranker_server(ctx.work_dir / "ranker_pinned", ON_5MS) as server:
        for round_ in range(rounds):
            rate = in_process_rate(lambda: onnx_session(onnx_path, 1), 1, dim, point_s)
            in_process.append(rate)
            with pinned_to({client}):
                result = run_load(server.grpc_url, dim, HOP_CLIENTS, point_s, warmup_s)
            triton.append(result)
            log.info(
                "ranker: round %d, pinned to core %d: in-process %s rows/s, Triton %s rows/s",
                round_ + 1,
                serving,
                format_rate(rate),
                format_rate(result.median_rows_per_s),
            )
    return PinnedHop(serving, client, in_process, triton)


# --- Triton ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One tritonserver configuration under test."""

    key: str
    label: str
    batching: BatchingSpec | None  # None: no dynamic_batching block
    instance_count: int = 1
    cpu_threads: int = 1


# This section compares batching on (the gpu-t4 profile's 5 ms, set explicitly: the cpu profile renders 0 ms
# since the batching study) with batching off; the shipped cpu config is 0 ms x 2 instances (batching section).
ON_5MS = BatchingSpec(max_queue_delay_microseconds=5000)
VARIANTS: tuple[Variant, ...] = (
    Variant("on", "batching on (5 ms), 1 instance x 1 thread", ON_5MS),
    Variant("off", "batching off (0 ms, no preferred sizes), 1 instance x 1 thread", no_batching()),
    Variant("none", "no dynamic batcher at all, 1 instance x 1 thread", None),
    Variant("on_i2", "batching on (5 ms), 2 instances x 1 thread [shipped instances]", ON_5MS, instance_count=2),
    Variant("on_t2", "batching on (5 ms), 1 instance x 2 threads", ON_5MS, cpu_threads=2),
)


def _manifest(model: str, repo: Path = MODEL_REPOSITORY) -> dict[str, Any]:
    return dict(json.loads((repo / model / "1" / "manifest.json").read_text()))


def export_table() -> tuple[str, dict[str, Any]]:
    bundle = json.loads((artifacts_dir(DATASET) / "manifest.json").read_text())
    rows = []
    for model in MODELS:
        m = _manifest(model)
        parity = max(p["max_abs_diff"] for p in m.get("parity", [])) if m.get("parity") else float("nan")
        rows.append(
            [
                f"`{model}/1/{m['file']}`",
                m["runtime"],
                f"{m['file_bytes'] / 1e6:.2f} MB",
                f"{m['export_seconds']:.2f} s",
                f"{parity:.1e}",
            ]
        )
    table = markdown_table(["file", "runtime", "size", "export (file only)", "parity max abs diff"], rows)
    return table, bundle


def run_section(ctx: BenchContext) -> SectionResult:
    ensure_artifacts()
    dim = embedding_dim()
    onnx_path = MODEL_REPOSITORY / MODEL / "1" / "model.onnx"
    quick = ctx.quick
    latency_budget_s = 0.3 if quick else 1.5
    point_s, warmup_s, rounds = (1.0, 0.3, 1) if quick else (2.0, 0.5, 3)
    load_before = load_average()

    log.info("ranker: ONNX Runtime latency by batch size (1 intra-op thread)")
    latency = latency_by_batch(onnx_session(onnx_path, 1), dim, latency_budget_s)

    in_process_configs: dict[str, tuple[str, Callable[[], ort.InferenceSession], int]] = {
        "1x1": ("1 thread, 1 session x 1 intra-op thread", lambda: onnx_session(onnx_path, 1), 1),
        "2x1": ("2 threads, a session each x 1 intra-op thread", lambda: onnx_session(onnx_path, 1), 2),
        "1x2": ("1 thread, 1 session x 2 intra-op threads", lambda: onnx_session(onnx_path, 2), 1),
    }
    triton: dict[str, dict[int, list[LoadResult]]] = {v.key: {c: [] for c in CLIENTS} for v in VARIANTS}
    in_process: dict[str, list[float]] = {k: [] for k in in_process_configs}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        servers: dict[str, TritonServer] = {}
        for v in VARIANTS:
            log.info("ranker: starting tritonserver %s", v.label)
            servers[v.key] = stack.enter_context(
                ranker_server(ctx.work_dir / f"ranker_{v.key}", v.batching, v.instance_count, v.cpu_threads)
            )
        # Rounds of every configuration in turn: a burst of background load on the shared machine then
        # lands on all of them, and the medians over rounds compare like with like.
        for round_ in range(rounds):
            for key, (label, make, workers) in in_process_configs.items():
                rate = in_process_rate(make, workers, dim, point_s)
                in_process[key].append(rate)
                log.info("ranker: round %d, in-process %s: %s rows/s", round_ + 1, label, format_rate(rate))
            for clients in CLIENTS:
                for v in VARIANTS:
                    r = run_load(servers[v.key].grpc_url, dim, clients, point_s, warmup_s)
                    triton[v.key][clients].append(r)
                    log.info(
                        "ranker: round %d, %s, %d clients: %s rows/s, p99 %.1f ms",
                        round_ + 1,
                        v.key,
                        clients,
                        format_rate(r.median_rows_per_s),
                        r.p99_ms,
                    )
    log.info("ranker: the server hop on one core (Triton and in-process ONNX Runtime pinned to the same core)")
    pinned = measure_pinned_hop(ctx, onnx_path, dim, point_s, warmup_s, rounds)
    measure_s = time.perf_counter() - started
    loads = f"1-minute load average {load_before} at the start, {load_average()} at the end"
    return summarize(
        ctx, latency, triton, in_process, in_process_configs, pinned, (point_s, warmup_s, rounds), measure_s, loads
    )


def pinned_paragraph(pinned: PinnedHop | None) -> str:
    if pinned is None:
        return (
            "**The one-core comparison did not run**: it needs two cores this process may pin threads to "
            "(Linux sched_setaffinity), one to serve and one for the load generator."
        )
    triton_rate = median([r.median_rows_per_s for r in pinned.triton])
    spread = Point.of(pinned.triton).spread
    verdict = "meets" if pinned.ratio >= 0.7 else "misses"
    return (
        f"**On the core that serves, Triton reaches {format_ratio(pinned.ratio)} ({pinned.ratio:.0%}) of "
        f"in-process ONNX Runtime's rows/s** ({format_rate(triton_rate)} against "
        f"{format_rate(median(pinned.in_process))}, medians over {len(pinned.triton)} round(s)): tritonserver "
        f"and its Python stub (1 instance x 1 intra-op thread, batching 5 ms) confined to core "
        f"{pinned.serving_core}, in-process one session x 1 intra-op thread on the same core, the "
        f"{HOP_CLIENTS} gRPC clients x {ROWS_PER_REQUEST} rows on core {pinned.client_core}. That is what the "
        "hop costs a Triton pod: gRPC in the server, the copy into the stub's shared memory, Python around the "
        f"model; it {verdict} the 70% target on the same cores. "
        + within_noise("the one-core ratio", pinned.ratio, spread, reference=0.7)
    )


def within_noise(what: str, value: float, noise_fraction: float, reference: float = 1.0) -> str:
    """Whether ``value`` differs from ``reference`` by more than the run-to-run noise, in words."""
    if noise_fraction != noise_fraction:  # one round: no noise measured
        return "One round only: no noise figure to judge it against."
    if abs(value - reference) <= noise_fraction * reference:
        return (
            f"With {noise_fraction:.0%} run-to-run noise, {what} ({value:.2f}) is within the noise of {reference:g}: "
            "a second run may land on the other side."
        )
    return f"With {noise_fraction:.0%} run-to-run noise, {what} ({value:.2f}) is clear of {reference:g}."


def summarize(
    ctx: BenchContext,
    latency: list[LatencyRow],
    triton: dict[str, dict[int, list[LoadResult]]],
    in_process: dict[str, list[float]],
    in_process_configs: dict[str, tuple[str, Any, int]],
    pinned: PinnedHop | None,
    timing: tuple[float, float, int],
    measure_s: float,
    loads: str,
) -> SectionResult:
    point_s, warmup_s, rounds = timing
    export, bundle = export_table()
    points = {key: {c: Point.of(rs) for c, rs in by_clients.items()} for key, by_clients in triton.items()}
    rate = {key: {c: p.rows_per_s for c, p in by_clients.items()} for key, by_clients in points.items()}
    measured_noise = noise([p for by_clients in points.values() for p in by_clients.values()])
    ip_rate = {key: median(rates) for key, rates in in_process.items()}
    best_ip = max(ip_rate, key=lambda k: ip_rate[k])
    best_variant = max(rate, key=lambda k: rate[k][HOP_CLIENTS])
    labels = {v.key: v.label for v in VARIANTS}

    batching_ratio = ratio(rate["on"][HOP_CLIENTS], rate["off"][HOP_CLIENTS])
    batcher_ratio = ratio(rate["on"][HOP_CLIENTS], rate["none"][HOP_CLIENTS])
    hop_shipped = ratio(rate["on_i2"][HOP_CLIENTS], ip_rate[best_ip])
    hop_best = ratio(rate[best_variant][HOP_CLIENTS], ip_rate[best_ip])
    instances_ratio = ratio(rate["on_i2"][HOP_CLIENTS], rate["on"][HOP_CLIENTS])

    latency_table = markdown_table(
        ["batch (rows)", "runs", "p50 ms", "p99 ms", "rows/s at p50"],
        [[r.batch, r.runs, f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}", format_rate(r.rows_per_s)] for r in latency],
    )
    triton_rows = []
    for v in VARIANTS:
        cells: list[object] = [v.label]
        for c in CLIENTS:
            point = points[v.key][c]
            cells.append(
                f"{format_rate(point.rows_per_s)} · p99 {point.p99_ms:.1f} ms · {point.rows_per_execution:.0f}"
            )
        triton_rows.append(cells)
    triton_table = markdown_table(["server", *(f"{c} client{'s' if c > 1 else ''}" for c in CLIENTS)], triton_rows)
    ratio_rows = [
        [c, format_ratio(ratio(rate["on"][c], rate["off"][c])), format_ratio(ratio(rate["on"][c], rate["none"][c]))]
        for c in CLIENTS
    ]
    ratio_table = markdown_table(["clients", "on (5 ms) / off (0 ms)", "on (5 ms) / no batcher"], ratio_rows)
    ip_table = markdown_table(
        ["in-process ONNX Runtime, 200-row batches", "rows/s (median over rounds)"],
        [[label, format_rate(ip_rate[k])] for k, (label, _, _) in in_process_configs.items()],
    )
    train_s = bundle.get("train_seconds")
    export_s = bundle.get("export_seconds")
    md = "\n".join(
        [
            "## Ranker: export, ONNX Runtime on the CPU, Triton (cpu profile)",
            "",
            ctx.provenance(),
            "",
            f"Model: `{bundle['model_version']}` (synthetic data set, {bundle['n_users']} users x "
            f"{bundle['n_items']} items, embedding dim {bundle['embedding_dim']}), the default export of "
            "`python -m export all`.",
            "",
            "### Export time and model sizes",
            "",
            f"From the per-export `model_repository/<model>/1/manifest.json`. Training took {train_s} s; the "
            f"whole export step (both files, parity checks on batches of 1, 7 and 1024, configs) {export_s} s.",
            "",
            export,
            "",
            "### ONNX Runtime CPU latency by batch size",
            "",
            "In process, one session with 1 intra-op thread (as each cpu-profile Triton instance runs it), "
            f"{'0.3' if ctx.quick else '1.5'} s per batch size (at least 30 runs); `runs` is N.",
            "",
            latency_table,
            "",
            "### Ranker rows/s through Triton: dynamic batching on and off",
            "",
            f"`{MODEL}` alone in a tritonserver per configuration (all {len(VARIANTS)} up side by side), "
            f"closed-loop clients on one gRPC aio channel, {ROWS_PER_REQUEST} rows per request. Each point: "
            f"{warmup_s:g} s warm-up, {point_s:g} s measured, {rounds} round(s) with every configuration "
            f"measured in turn; figures are medians over rounds of the median rows/s over 0.5 s windows. "
            f"Measuring took {measure_s:.0f} s; {loads}. Run-to-run noise: the median spread of rows/s between "
            f"rounds of the same point is {measured_noise:.0%}. Cell: rows/s · p99 · mean rows per model execution.",
            "",
            triton_table,
            "",
            ratio_table,
            "",
            f"**Dynamic batching at {HOP_CLIENTS} clients: {format_ratio(batching_ratio)} the rows/s of batching "
            f"off as the target defines it (0 ms, no preferred sizes), {format_ratio(batcher_ratio)} the rows/s of no "
            "batcher at all** (1 instance in each, so that only batching differs). At 0 ms Triton still "
            "merges the requests that queue "
            'while the instance is busy (see rows per execution), so "off" is itself batching under load; only '
            "the config without a `dynamic_batching` block runs one request per execution. The reference "
            "design's 5-10x is a GPU figure: see the batching section for why the CPU gains less. "
            + within_noise("on / off at 32 clients", batching_ratio, measured_noise),
            "",
            f"**Instances: 2 instances x 1 thread give {format_ratio(instances_ratio)} the rows/s of 1 instance** "
            f"at {HOP_CLIENTS} clients with batching on; best configuration at {HOP_CLIENTS} clients: "
            f"{labels[best_variant]}.",
            "",
            "### The server hop: Triton against in-process ONNX Runtime on the same cores",
            "",
            ip_table,
            "",
            f"Two in-process threads give {format_ratio(ratio(ip_rate['2x1'], ip_rate['1x1']))} the rows/s of one "
            f"and one session with 2 intra-op threads {format_ratio(ratio(ip_rate['1x2'], ip_rate['1x1']))} (2x if "
            "the second core were free): the second core is far from free on this shared machine, so the fair "
            "in-process reference is the best of the three, which the ratio below uses.",
            "",
            pinned_paragraph(pinned),
            "",
            f"**With the load generator on the same cores, Triton at {HOP_CLIENTS} clients x {ROWS_PER_REQUEST} "
            f"rows reaches {format_ratio(hop_shipped)} ({hop_shipped:.0%}) of the best in-process rows/s** with "
            f"the shipped instances (2 x 1 thread, 5 ms delay here: at {HOP_CLIENTS} clients the delay does not "
            f"move rows/s, batching section), {hop_best:.0%} with the best one ({labels[best_variant]}). "
            + within_noise("this ratio", hop_shipped, measured_noise, reference=0.7)
            + " The gap to the pinned figure is the client's own CPU (Python gRPC building each request and "
            "parsing each reply), which in production lands on the orchestrator's cores, not on Triton's.",
        ]
    )
    measurements = {
        "triton_cpu_rows_per_s": Measured(
            round(rate["on_i2"][HOP_CLIENTS]),
            "ranker rows/s of the cpu-profile Triton with the shipped instances (Python backend, ONNX Runtime, "
            f"2 instances x 1 intra-op thread), dynamic batching 5 ms, {HOP_CLIENTS} clients x {ROWS_PER_REQUEST} "
            "rows, load generator on the same cores",
        ),
        "onnxruntime_cpu_rows_per_s": Measured(
            round(ip_rate[best_ip]),
            f"ranker rows/s of in-process ONNX Runtime, {in_process_configs[best_ip][0]}, "
            f"{ROWS_PER_REQUEST}-row batches, on this machine's {ctx.machine.cores} cores",
        ),
        "triton_cpu_dynamic_batching_ratio": Measured(
            round(batching_ratio, 3),
            f"x: Triton rows/s with dynamic batching (5 ms) over batching off, {HOP_CLIENTS} clients, cpu profile",
        ),
        "triton_cpu_server_hop_ratio": Measured(
            round(hop_shipped, 3),
            f"Triton rows/s ({HOP_CLIENTS} clients x {ROWS_PER_REQUEST} rows, shipped cpu instances) over the best "
            "in-process ONNX Runtime rows/s, load generator on the same cores",
        ),
    }
    if pinned is not None:
        measurements["triton_cpu_server_hop_ratio_one_core"] = Measured(
            round(pinned.ratio, 3),
            f"Triton rows/s (server and stub on one core, {HOP_CLIENTS} clients x {ROWS_PER_REQUEST} rows on "
            "another) over in-process ONNX Runtime rows/s on that same core",
        )
    return SectionResult(md, measurements)
