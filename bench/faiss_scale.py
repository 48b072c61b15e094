"""``python -m bench.faiss_scale``: the FAISS item index at 1M items, kind against kind.

For each data kind (tight, medium and loose clusters) and each approximate index kind of ``export.faiss_index``
(IVF-HNSW-Flat, IVF-HNSW-PQ with SQ8 refinement, HNSW-Flat) it builds the index with the build's own code,
lets the build's own tuning choose every search parameter on 1,000 *tuning* users, and reports on 1,000
*held-out* users (other draws from the same model): recall@100 against exact search, the share of
full-length lists at k=200, 500 and 1,000, single-query latency at k=200 on one thread (p50, p99), bytes per
item (serialized index / items, and the RSS the loaded index adds / items), build and tuning time.

The data (``latent_mixture``): ``n / 1000`` cluster centres uniform on the unit sphere of ``dim`` dimensions,
cluster popularity log-normal (sigma 1, so lists and neighbourhoods are uneven, as a catalogue is); an item is
its centre plus isotropic Gaussian noise of norm ~``spread``, normalized (the two-tower normalizes its
embeddings); a user is a mix of one to three centres drawn by popularity, weights Dirichlet(1), plus noise of
the same spread, normalized. ``tight``: spread 0.5 (an item's cosine to its centre ~0.89); ``medium``: 1.0
(~0.71); ``loose``: 1.5 (~0.55: neighbourhoods blur into each other and the data is close to isotropic in all
128 dimensions, the hard case for every approximate index).

``--bundle DIR`` measures the data kind ``trained`` instead: a bundle's own item vectors (build/artifacts/NAME/vN,
e.g. the ``synthetic-1m`` profile's 1M items), with tuning and held-out users drawn from its user vectors,
disjoint; ``--write-docs`` then writes the ``faiss-trained`` section and leaves measurements.json alone (one
model's catalogue is a check of the build, the planning inputs come from the three spreads).

``--write-docs`` replaces the ``faiss`` section of docs/BENCHMARKS.md and sets the FAISS inputs of
docs/measurements.json (bytes per item flat and PQ, searches/s per core); the raw figures go to
``build/bench/faiss_scale.json`` after every index, so a long run keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.runner import (
    BENCH_DIR,
    BENCHMARKS_PATH,
    MEASUREMENTS_PATH,
    BenchContext,
    Machine,
    Measured,
    SectionResult,
    markdown_table,
    percentile,
    replace_section,
    update_measurements,
)
from export.faiss_index import (
    FULL_K,
    LARGE_KINDS,
    RECALL_K,
    RECALL_TARGET,
    TUNING_MARGIN,
    IndexKind,
    Trial,
    Truth,
    apply_search_params,
    exact_neighbours,
    factory_string,
    measure,
    search_params_string,
    single_query_ms,
    train_and_add,
    tune,
)

log = logging.getLogger(__name__)

COMMAND = "python -m bench.faiss_scale"
SECTION = "faiss"
TRAINED_SECTION = "faiss-trained"
SPREADS = {"tight": 0.5, "medium": 1.0, "loose": 1.5}
APPROXIMATE: tuple[IndexKind, ...] = ("ivf_hnsw_flat", "ivf_flat", "ivf_hnsw_pq", "hnsw_flat")
TRAINED = "trained"
DEPTHS = (200, 500, 1000)
LATENCY_K = 200
JSON_PATH = BENCH_DIR / "faiss_scale.json"
REPO_ROOT = BENCH_DIR.parent.parent


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class LatentMixture:
    """The latent-cluster model items and users are drawn from (see the module docstring)."""

    def __init__(self, n_items: int, dim: int, spread: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.spread, self.n_items = dim, spread, n_items
        self.n_clusters = max(1, n_items // 1000)
        self.centres = _unit(rng.normal(size=(self.n_clusters, dim)).astype(np.float32))
        weights = rng.lognormal(0.0, 1.0, self.n_clusters)
        self.popularity = weights / weights.sum()
        self.seed = seed

    def _noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return (self.spread / np.sqrt(self.dim)) * rng.normal(size=(n, self.dim)).astype(np.float32)

    def items(self, chunk: int = 100_000) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1])
        out = np.empty((self.n_items, self.dim), np.float32)
        for start in range(0, self.n_items, chunk):
            m = min(chunk, self.n_items - start)
            cluster = rng.choice(self.n_clusters, size=m, p=self.popularity)
            out[start : start + m] = _unit(self.centres[cluster] + self._noise(rng, m))
        return out

    def users(self, n: int, stream: int) -> np.ndarray:
        """``n`` user vectors; another ``stream`` draws other users from the same model."""
        rng = np.random.default_rng([self.seed, 2, stream])
        interests = rng.integers(1, 4, size=n)
        mix = np.zeros((n, self.dim), np.float32)
        for row, count in enumerate(interests):
            clusters = rng.choice(self.n_clusters, size=count, p=self.popularity)
            mix[row] = rng.dirichlet(np.ones(count)).astype(np.float32) @ self.centres[clusters]
        return _unit(mix + self._noise(rng, n))


_RSS_PROBE = """
import sys, faiss
from pathlib import Path
def rss(): return int(Path("/proc/self/statm").read_text().split()[1])
before = rss()
index = faiss.read_index(sys.argv[1])
print((rss() - before) * __import__("os").sysconf("SC_PAGE_SIZE"))
"""


def rss_delta_of_loading(path: Path) -> int:
    """The resident memory ``faiss.read_index`` adds, in a fresh process (in this one, freed arenas are reused)."""
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def short_lists(index: faiss.Index, queries: np.ndarray, depths: tuple[int, ...]) -> dict[str, Any]:
    """Per depth: share of queries with a full list, and the -1 results in all."""
    out = {}
    for k in depths:
        _, rows = index.search(queries, k)
        out[str(k)] = {"full_fraction": float((rows >= 0).all(axis=1).mean()), "minus_ones": int((rows < 0).sum())}
    return out


def measure_kind(
    kind: IndexKind,
    items: np.ndarray,
    tuning: np.ndarray,
    held_out: np.ndarray,
    truth_tuning: Truth,
    truth_held_out: Truth,
    work: Path,
    seed: int,
) -> dict[str, Any]:
    n, dim = items.shape
    row: dict[str, Any] = {"kind": kind, "factory": factory_string(kind, n, dim), "load_before": load_average()}
    started = time.perf_counter()
    index = train_and_add(kind, items, np.random.default_rng(seed))
    row["build_s"] = round(time.perf_counter() - started, 1)
    row["load_after_build"] = load_average()
    started = time.perf_counter()
    chosen, trials = tune(index, kind, tuning, truth_tuning, FULL_K, RECALL_TARGET + TUNING_MARGIN)
    row["tune_s"] = round(time.perf_counter() - started, 1)
    row["trials"] = [asdict(t) for t in trials]
    if chosen is None:
        row["chosen"] = None
        log.warning("%s: no setting met the target on the tuning users", row["factory"])
        best = max(trials, key=lambda t: t.recall)
        params = best.params
    else:
        params = chosen.params
        row["chosen"] = asdict(chosen)
    report: Trial = measure(index, kind, params, held_out, truth_held_out, 0)
    row["params"] = params
    row["recall_held_out"] = report.recall
    row["cost_held_out"] = report.cost
    apply_search_params(index, params)
    row["short_lists_held_out"] = short_lists(index, held_out, DEPTHS)
    path = work / f"{kind}.faiss"
    faiss.write_index(index, str(path))
    row["file_bytes"] = path.stat().st_size
    del index
    gc.collect()
    row["rss_delta_bytes"] = rss_delta_of_loading(path)
    loaded = faiss.read_index(str(path))
    apply_search_params(loaded, params)
    row["load_before_latency"] = load_average()
    wall, cpu = single_query_ms(loaded, held_out, LATENCY_K)
    row["load_after_latency"] = load_average()
    row["latency_ms"] = {"p50": percentile(wall, 50), "p99": percentile(wall, 99), "mean": float(np.mean(wall))}
    row["latency_ms"] |= {"n": len(wall), "cpu_p50": percentile(cpu, 50), "cpu_p99": percentile(cpu, 99)}
    row["latency_ms"]["cpu_mean"] = float(np.mean(cpu))
    del loaded
    path.unlink()
    gc.collect()
    return row


def trained_catalogue(
    bundle: Path, n_tuning: int, n_held_out: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bundle's item vectors, and two disjoint random samples of its user vectors (tuning, held out)."""
    items = np.ascontiguousarray(np.load(bundle / "item_embeddings.npy"), dtype=np.float32)
    users = np.load(bundle / "user_embeddings.npy", mmap_mode="r")
    rows = np.random.default_rng([seed, 3]).choice(
        len(users), size=min(len(users), n_tuning + n_held_out), replace=False
    )
    picked = np.ascontiguousarray(users[np.sort(rows[:n_tuning])], dtype=np.float32)
    other = np.ascontiguousarray(users[np.sort(rows[n_tuning:])], dtype=np.float32)
    return items, picked, other


def run(args: argparse.Namespace) -> dict[str, Any]:
    faiss.omp_set_num_threads(args.threads)
    result: dict[str, Any] = {
        "command": args.command_line,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": Machine.detect().describe(),
        "items": args.items,
        "dim": args.dim,
        "threads_build": args.threads,
        "load_start": load_average(),
        "json": str(args.json),
        "runs": [],
    }
    work = args.json.parent
    work.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        started = time.perf_counter()
        if data == TRAINED:
            items, tuning, held_out = trained_catalogue(args.bundle, args.tuning_users, args.held_out_users, args.seed)
            result["items"], result["dim"], result["bundle"] = len(items), items.shape[1], str(args.bundle)
        else:
            model = LatentMixture(args.items, args.dim, SPREADS[data], seed=args.seed)
            items = model.items()
            tuning = model.users(args.tuning_users, stream=1)
            held_out = model.users(args.held_out_users, stream=2)
        truth_tuning = exact_neighbours(items, tuning, RECALL_K)
        truth_held_out = exact_neighbours(items, held_out, RECALL_K)
        log.info("%s data: %d items, exact neighbours in %.1f s", data, len(items), time.perf_counter() - started)
        for kind in args.kinds:
            log.info("%s data: building %s", data, kind)
            row = measure_kind(kind, items, tuning, held_out, truth_tuning, truth_held_out, work, args.seed)
            row["data"] = data
            row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            result["runs"].append(row)
            log.info(
                "%s %s: %s recall %.4f p50 %.3f ms p99 %.3f ms",
                data,
                kind,
                search_params_string(row["params"]),
                row["recall_held_out"],
                row["latency_ms"]["p50"],
                row["latency_ms"]["p99"],
            )
            args.json.write_text(json.dumps(result, indent=1))
        del items
        gc.collect()
    result["load_end"] = load_average()
    args.json.write_text(json.dumps(result, indent=1))
    return result


def _old_tuning(row: dict[str, Any]) -> Trial | None:
    """What an nprobe-only tuning chooses (efSearch left at 16, nprobe doubled until tuning recall >= 0.95)."""
    for t in row["trials"]:
        p = t["params"]
        if p.get("quantizer_efSearch") == 16 and "k_factor_rf" not in p and t["recall"] >= RECALL_TARGET:
            return Trial(**t)
    return None


def markdown(result: dict[str, Any]) -> str:
    n = result["items"]
    rows = []
    order = {name: i for i, name in enumerate([*SPREADS, TRAINED, *APPROXIMATE])}
    runs = sorted(result["runs"], key=lambda r: (order[r["data"]], order[r["kind"]]))
    for r in runs:
        lat = r["latency_ms"]
        short = r["short_lists_held_out"]
        rows.append(
            [
                r["data"],
                f"`{r['factory']}`",
                f"`{search_params_string(r['params'])}`" + ("" if r["chosen"] else " (target not met)"),
                f"{r['recall_held_out']:.4f}",
                " / ".join(f"{short[str(k)]['full_fraction']:.3f}" for k in DEPTHS),
                f"{lat['p50']:.3f} / {lat['p99']:.3f}",
                f"{lat['cpu_p50']:.3f} / {lat['cpu_p99']:.3f}",
                f"{r['file_bytes'] / n:.0f} / {r['rss_delta_bytes'] / n:.0f}",
                f"{r['build_s']:.0f} + {r['tune_s']:.0f}",
                r["load_before_latency"],
            ]
        )
    table = markdown_table(
        [
            "data",
            "index",
            "search params (chosen on tuning users)",
            "recall@100 held-out",
            "full lists @200/500/1000",
            "wall p50 / p99 ms, k=200, 1 thread",
            "CPU p50 / p99 ms",
            "bytes/item file / RSS",
            "build + tune s",
            "load avg (latency)",
        ],
        rows,
    )
    if "bundle" in result:
        title = f"## FAISS item index on a trained catalogue: {n:,} items of {result['bundle']}"
        source = (
            f"{n:,} items x {result['dim']} dims: the two-tower item vectors of the bundle, 1,000 tuning users and "
            "1,000 held-out users drawn (disjoint) from its user vectors. "
        )
    else:
        title = "## FAISS item index at 1M items: IVF-HNSW-Flat, IVF-Flat, IVF-HNSW-PQ + refinement, HNSW"
        source = (
            f"{n:,} items x {result['dim']} dims (TrainConfig.embedding_dim) per data kind, synthetic from the "
            "latent-cluster mixture in `bench/faiss_scale.py` (noise tight 0.5, medium 1.0, loose 1.5); 1,000 tuning "
            "users and 1,000 held-out users drawn from the same model. "
        )
    lines = [
        title,
        "",
        f"Command: `{result['command']}` · date: {result['date']} · machine: {result['machine']} · "
        f"load average {result['load_start']} at the start, {result.get('load_end', '?')} at the end "
        f"(build and tuning with {result['threads_build']} FAISS threads, latency with 1).",
        "",
        source + "Each index is built by `export.faiss_index."
        "train_and_add` and its search parameters are chosen by the build's own `tune`: the cheapest grid "
        f"setting (distance computations per query) with recall@100 >= {RECALL_TARGET + TUNING_MARGIN} on the "
        f"tuning users and every list full at k={FULL_K}. Recall, full lists and latency are measured on the "
        "held-out users only. Bytes per item: serialized index / items, and the RSS that `faiss.read_index` "
        "added in a fresh process / items. Latency: 1,000 single held-out queries at k=200 on one FAISS thread, "
        "wall-clock and the thread's CPU time (on a loaded machine the wall-clock tail is mostly time spent "
        "preempted by other jobs; the CPU time is what the search itself costs).",
        "",
        table,
        "",
    ]
    fastest = []
    for data in dict.fromkeys(r["data"] for r in runs):
        met = sorted((r for r in runs if r["data"] == data and r["chosen"]), key=lambda r: r["latency_ms"]["cpu_p50"])
        if met:
            others = ", ".join(f"`{r['factory']}` {r['latency_ms']['cpu_p50']:.3f} ms" for r in met[1:])
            fastest.append(
                f"- {data}: `{met[0]['factory']}`, {met[0]['latency_ms']['cpu_p50']:.3f} ms CPU p50 at recall@100 "
                f"{met[0]['recall_held_out']:.4f}" + (f" (then {others})" if others else "")
            )
    if fastest:
        lines += ["Fastest kind that met the target, per data kind (CPU p50 per query, k=200):", "", *fastest, ""]
    notes = []
    for r in result["runs"]:
        old = _old_tuning(r) if r["kind"] == "ivf_hnsw_flat" else None
        ef16 = [
            t for t in r["trials"] if t["params"].get("quantizer_efSearch") == 16 and "k_factor_rf" not in t["params"]
        ]
        if r["kind"] == "ivf_hnsw_flat" and ef16:
            top = max(ef16, key=lambda t: t["recall"])
            text = (
                f"- {r['data']}: at the quantizer's default efSearch 16 the tuning recall reaches "
                f"{top['recall']:.4f} (`{search_params_string(top['params'])}`)"
            )
            shallow = ", ".join(
                f"{t['full_fraction']:.1%} at nprobe={t['params']['nprobe']}"
                for t in ef16
                if t["params"]["nprobe"] <= 8
            )
            text += f"; lists full at k={FULL_K}: {shallow}"
            if old is not None:
                text += (
                    f"; an nprobe-only tuning would stop at `nprobe={old.params['nprobe']}` where "
                    f"{old.full_fraction:.1%} of tuning lists at k={FULL_K} are full"
                )
            notes.append(text + ".")
    if notes:
        lines += ["What an nprobe-only tuning (efSearch fixed at 16) would ship:", "", *notes, ""]
    raw = Path(result.get("json", JSON_PATH)).resolve()
    shown = raw.relative_to(REPO_ROOT) if raw.is_relative_to(REPO_ROOT) else raw
    lines.append(f"Raw figures, every grid setting tried included: `{shown}`.")
    return "\n".join(lines)


def built_kind(result: dict[str, Any], data: str) -> dict[str, Any] | None:
    """The run of ``data`` that the build would ship: of ``LARGE_KINDS`` that met the target, the fastest."""
    met = [r for r in result["runs"] if r["data"] == data and r["kind"] in LARGE_KINDS and r["chosen"]]
    return min(met, key=lambda r: r["latency_ms"]["cpu_p50"], default=None)


def measurements(result: dict[str, Any]) -> dict[str, Measured]:
    n = result["items"]
    by = {(r["data"], r["kind"]): r for r in result["runs"]}
    out = {}
    flat = [r for r in (built_kind(result, d) for d in SPREADS) if r is not None]
    if flat:
        names = " / ".join(dict.fromkeys(r["factory"] for r in flat))
        out["faiss_bytes_per_item"] = Measured(
            round(max(r["file_bytes"] for r in flat) / n),
            f"bytes per item of {names} ({n:,} items x {result['dim']} dims; serialized size / items)",
        )
        # Per core = per CPU-second of the searching thread: on a shared machine the wall-clock mean also
        # counts the time other jobs held the core.
        slowest = max(flat, key=lambda r: r["latency_ms"]["cpu_mean"])
        out["faiss_search_qps_per_core"] = Measured(
            round(1000 / slowest["latency_ms"]["cpu_mean"]),
            f"k=200 searches per CPU-second of one thread of {slowest['factory']} at its tuned parameters "
            f"(recall@100 >= {RECALL_TARGET} on held-out users), {n:,} items, the slowest data kind "
            f"({slowest['data']}; 1 / mean CPU time)",
        )
    pq = [by[d, "ivf_hnsw_pq"] for d in SPREADS if (d, "ivf_hnsw_pq") in by]
    if pq:
        out["faiss_bytes_per_item_pq"] = Measured(
            round(max(r["file_bytes"] for r in pq) / n),
            f"bytes per item of {pq[0]['factory']} ({n:,} items x {result['dim']} dims; serialized size / items)",
        )
    return out


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of the same size (e.g. one process per data kind, run side by side) as one result."""
    if len({(r["items"], r["dim"]) for r in results}) != 1:
        raise ValueError(f"expected runs of one size, but found {[(r['items'], r['dim']) for r in results]}")
    merged = dict(results[0])
    merged["command"] = (
        " and ".join(f"{r['command']} ({r['date']})" for r in results) if len(results) > 1 else merged["command"]
    )
    merged["load_end"] = results[-1].get("load_end", "?")
    merged["runs"] = [run for r in results for run in r["runs"]]
    return merged


def run_section(ctx: BenchContext) -> SectionResult:
    """For ``bench.runner``: the same run (100K items with ``--quick``)."""
    args = parse_args(["--items", "100000"] if ctx.quick else [])
    args.command_line = ctx.command
    result = run(args)
    return SectionResult(markdown(result), measurements(result))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--data", nargs="+", choices=(*SPREADS, TRAINED), help="default: the three spreads, or trained with --bundle"
    )
    parser.add_argument("--bundle", type=Path, help="a bundle folder: its items and users make the data kind 'trained'")
    parser.add_argument("--kinds", nargs="+", choices=APPROXIMATE, default=list(APPROXIMATE))
    parser.add_argument("--tuning-users", type=int, default=1000)
    parser.add_argument("--held-out-users", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads for build and tuning (%(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    parser.add_argument(
        "--render", nargs="+", type=Path, metavar="JSON", help="only render the markdown from these runs' JSON files"
    )
    parser.add_argument("--write-docs", action="store_true", help="write docs/BENCHMARKS.md and docs/measurements.json")
    args = parser.parse_args(argv)
    if args.data is None:
        args.data = [TRAINED] if args.bundle is not None else list(SPREADS)
    if (TRAINED in args.data) != (args.bundle is not None) or (TRAINED in args.data and len(args.data) > 1):
        parser.error(f"--bundle DIR goes with the data kind {TRAINED!r} alone, and {TRAINED!r} needs --bundle")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.command_line = " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])])
    result = merge([json.loads(path.read_text()) for path in args.render]) if args.render else run(args)
    text = markdown(result)
    print(text)
    if args.write_docs and "bundle" in result:  # one model's catalogue: reported beside, not a planning input
        replace_section(BENCHMARKS_PATH, TRAINED_SECTION, text)
    elif args.write_docs:
        replace_section(BENCHMARKS_PATH, SECTION, text)
        update_measurements(MEASUREMENTS_PATH, measurements(result), f"{result['command']} ({result['date']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
