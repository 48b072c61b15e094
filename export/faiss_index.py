"""Build the FAISS item index and choose its search parameters by measurement.

Below ``exact_threshold`` items the index is exact (``Flat``). From there on it is one of the approximate
kinds in ``factory_string``: by default the faster at the recall target of ``LARGE_KINDS``, IVF with an HNSW
quantizer or IVF with an exact quantizer (the 1M-item comparison in docs/BENCHMARKS.md, ``python -m
bench.faiss_scale``, measures both beside IVF-PQ and HNSW). Every search parameter a kind has (``nprobe``,
the HNSW quantizer's ``efSearch``, the refinement's ``k_factor``; ``efSearch`` for a plain HNSW) is chosen
on a small grid: the cheapest setting, in distance computations per query, whose recall@100 against exact
search reaches the target on *tuning* queries and whose every tuning query gets a full list at ``full_k``.
The recall it then reaches on *held-out* queries (disjoint from the tuning ones) is what the manifest
reports, and the build fails if that is below the target. The serving side
(``orchestrator.retrieval.FaissRetriever``) applies the recorded parameters when it loads the index.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import faiss
import numpy as np

from export.artifacts import write_json
from export.errors import IndexBuildError
from orchestrator.retrieval import IndexManifest, apply_search_params, search_params_string

log = logging.getLogger(__name__)

EXACT_THRESHOLD = 50_000
RECALL_TARGET = 0.95
RECALL_K = 100
# Tuning aims a little above the target: the held-out estimate (1,000 queries x 100 neighbours) moves by
# a few thousandths from one query sample to the next, and the target must hold on the held-out one.
TUNING_MARGIN = 0.005
# A returned item scoring within this of the k-th exact score is a hit (ann-benchmarks' epsilon): scores are
# cosines of unit vectors, so 1e-3 is a thousandth of their range.
RECALL_EPSILON = 1e-3
# The depth whose lists must come back full: the serving path asks for 200 candidates, the pre-compute for
# 200 + the longest history. An IVF at low nprobe scans too few codes to fill such a list (at nprobe 1 to 4,
# 29% to 99% of lists at k=1,000 come back short: docs/BENCHMARKS.md, section faiss), so the tuning rejects
# any setting that leaves a tuning query short at this depth.
FULL_K = 1000
N_TUNING_QUERIES = 1000
N_HELD_OUT_QUERIES = 1000
SERVING_K = 200  # the depth a serving request searches
N_TIMED_QUERIES = 300  # single queries timed per kind when the build chooses between kinds

IndexKind = Literal["flat", "ivf_hnsw_flat", "ivf_flat", "ivf_hnsw_pq", "hnsw_flat"]
INDEX_KINDS: tuple[IndexKind, ...] = get_args(IndexKind)
# The approximate kinds built from exact_threshold items on, both with float32 codes (the 1M-item comparison in
# docs/BENCHMARKS.md, section faiss: the kinds whose memory fits an orchestrator pod and that meet recall and
# full lists on every data kind). Each is built and tuned on the catalogue at hand, and of the settings that
# meet the target the one that searches fastest wins. The HNSW quantizer is as fast on tightly clustered
# catalogues (a few graph steps find the lists); on looser ones, and on the trained 1M-item catalogue of the
# synthetic-1m profile, its graph needs efSearch 512+ to find them, where an exact quantizer scores all 4,096
# centroids in less time (docs/SCALE.md).
LARGE_KINDS: tuple[IndexKind, ...] = ("ivf_hnsw_flat", "ivf_flat")

EF_SEARCH_GRID = (16, 32, 64, 128, 256, 512, 1024, 2048)  # the IVF's HNSW quantizer
HNSW_EF_SEARCH_GRID = (32, 64, 128, 192, 256, 384, 512, 768, 1024)  # a plain HNSW index (FAISS uses max(efSearch, k))
K_FACTOR_GRID = (2, 4, 8)  # refinement: re-rank k x k_factor PQ candidates by their SQ8 codes
# Cost of one distance computation relative to a float32 dot product of the full vector: a 4-bit
# fast-scan PQ code is looked up 32 codes at a time in SIMD registers; an SQ8 code decodes then multiplies.
CODE_COST = {"flat": 1.0, "pq4fs": 1.0 / 16, "sq8": 1.0}


def nlist_for(n: int) -> int:
    """The number of IVF lists: the power of two nearest to 4 sqrt(n) (4,096 at 1M items)."""
    return 1 << round(math.log2(4 * math.sqrt(n)))


def factory_string(kind: IndexKind, n: int, dim: int) -> str:
    nlist = nlist_for(n)
    if kind == "flat":
        return "Flat"
    if kind == "ivf_hnsw_flat":
        return f"IVF{nlist}_HNSW32,Flat"
    if kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    if kind == "ivf_hnsw_pq":
        # 4-bit fast-scan PQ on residuals, dim/2 sub-quantizers (dim/4 bytes), re-ranked by 8-bit scalar codes:
        # a raw-vector refinement (RFlat) would keep the float32 vectors and cost more memory than Flat.
        if dim % 2:
            raise IndexBuildError(f"expected an even embedding dim for PQ{dim}/2, but found {dim}")
        return f"IVF{nlist}_HNSW32,PQ{dim // 2}x4fsr,Refine(SQ8)"
    if kind == "hnsw_flat":
        return "HNSW32,Flat"
    raise IndexBuildError(f"expected an index kind among {INDEX_KINDS}, but found {kind!r}")


def train_and_add(kind: IndexKind, vectors: np.ndarray, rng: np.random.Generator) -> faiss.Index:
    """The index of ``kind`` over ``vectors`` (trained on a sample of 40 vectors per list, the FAISS minimum)."""
    n, dim = vectors.shape
    index = faiss.index_factory(dim, factory_string(kind, n, dim), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            # Unit-norm centroids: inner product on them is cosine, the measure the items' own (unit) vectors
            # are ranked by, so no list wins its queries by the norm of its centroid alone.
            ivf.cp.spherical = True
        sample = min(n, 40 * nlist_for(n))
        rows = np.sort(rng.choice(n, size=sample, replace=False))
        index.train(vectors[rows])
    for start in range(0, n, 200_000):  # in chunks: the HNSW graph and the IVF assignment both take batches
        index.add(vectors[start : start + 200_000])
    return index


@dataclass(frozen=True)
class Truth:
    """The exact top-k of some queries over ``vectors``, and what counts as finding them: every returned
    item whose true score is at least the k-th exact score less ``RECALL_EPSILON`` (as ann-benchmarks counts
    recall). A trained model's catalogue holds near-ties at the boundary (items alike but for an id
    embedding training barely touched, scores apart by less than float rounding): by id alone, an exact
    scan in another summation order would miss them too."""

    queries: np.ndarray
    vectors: np.ndarray
    rows: np.ndarray  # int64 [n, k]
    scores: np.ndarray  # float32 [n, k], best first

    @property
    def k(self) -> int:
        return int(self.rows.shape[1])


def recall_at_k(approx: np.ndarray, truth: Truth) -> float:
    """Share of the exact neighbours that ``approx`` (rows per query; -1: no result) found, near-ties counted
    (``Truth``); each query counts at most k."""
    floors = truth.scores[:, -1] - RECALL_EPSILON
    hits = 0
    for query, found, floor in zip(truth.queries, approx, floors, strict=True):
        rows = np.unique(found[found >= 0])
        hits += min(truth.k, int((truth.vectors[rows] @ query >= floor).sum()))
    return hits / truth.rows.size


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> Truth:
    """Exact top-k rows by inner product, without copying ``vectors`` into a second index."""
    scores, rows = faiss.knn(queries, vectors, k, faiss.METRIC_INNER_PRODUCT)
    return Truth(queries, vectors, rows, scores)


@dataclass(frozen=True)
class Trial:
    """One search setting measured on one query set."""

    params: dict[str, int]
    recall: float  # recall@100 against exact search
    full_fraction: float  # share of queries whose list at full_k has no -1
    cost: float  # distance computations per query at k=100, weighted by CODE_COST


def search_grid(kind: IndexKind, nlist: int) -> Iterator[list[dict[str, int]]]:
    """Chains of settings in increasing cost: a chain stops at its first setting that meets the target.

    IVF kinds with an HNSW quantizer: per quantizer efSearch, nprobe doubles up to efSearch (the quantizer
    returns max(efSearch, nprobe) candidates anyway); the last chain goes on to nlist with efSearch raised to
    nprobe, the search breadth a graph needs to return that many lists; with PQ, once per refinement
    factor. An exact quantizer (``ivf_flat``): nprobe doubles up to nlist."""
    if kind == "hnsw_flat":
        yield [{"efSearch": ef} for ef in HNSW_EF_SEARCH_GRID]
        return
    if kind == "ivf_flat":
        yield [{"nprobe": 1 << i} for i in range(nlist.bit_length()) if 1 << i <= nlist]
        return
    factors: tuple[int | None, ...] = K_FACTOR_GRID if kind == "ivf_hnsw_pq" else (None,)
    for factor in factors:
        for ef in EF_SEARCH_GRID:
            top = nlist if ef == EF_SEARCH_GRID[-1] else min(ef, nlist)
            chain = []
            nprobe = 1
            while nprobe <= top:
                params = {"nprobe": nprobe, "quantizer_efSearch": max(ef, nprobe)}
                if factor is not None:
                    params["k_factor_rf"] = factor
                chain.append(params)
                nprobe *= 2
            yield chain


def measure(
    index: faiss.Index, kind: IndexKind, params: dict[str, int], queries: np.ndarray, truth: Truth, full_k: int
) -> Trial:
    """Recall@100, share of full lists at ``full_k`` and cost per query of ``params`` on ``queries``."""
    apply_search_params(index, params)
    k = truth.k
    stats = cast(Any, faiss.cvar)  # SWIG globals: the stubs do not list them
    stats.indexIVF_stats.reset()
    stats.hnsw_stats.reset()
    _, found = index.search(queries, k)
    graph = stats.hnsw_stats.ndis  # the HNSW index's or the IVF quantizer's distance computations
    if kind == "ivf_flat":
        graph = len(queries) * faiss.extract_index_ivf(index).nlist  # an exact quantizer scores every centroid
    codes = stats.indexIVF_stats.ndis  # codes scanned in the probed lists
    code_cost = CODE_COST["pq4fs"] if kind == "ivf_hnsw_pq" else CODE_COST["flat"]
    refined = len(queries) * k * params.get("k_factor_rf", 0) * CODE_COST["sq8"]
    cost = (graph + codes * code_cost + refined) / len(queries)
    full_fraction = 1.0
    if full_k > 0:
        _, deep = index.search(queries, full_k)
        full_fraction = float((deep >= 0).all(axis=1).mean())
    return Trial(dict(params), recall_at_k(found, truth), full_fraction, cost)


def tune(
    index: faiss.Index,
    kind: IndexKind,
    queries: np.ndarray,
    truth: Truth,
    full_k: int,
    target: float,
) -> tuple[Trial | None, list[Trial]]:
    """The cheapest grid setting with recall >= ``target`` and every list full at ``full_k`` (None if no
    setting qualifies), and every trial measured on the way."""
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 0
    trials: list[Trial] = []
    best: Trial | None = None
    for chain in search_grid(kind, nlist):
        for params in chain:
            trial = measure(index, kind, params, queries, truth, full_k)
            trials.append(trial)
            log.info(
                "%s recall@%d=%.4f full@%d=%.3f cost=%.0f",
                search_params_string(params),
                truth.k,
                trial.recall,
                full_k,
                trial.full_fraction,
                trial.cost,
            )
            if trial.recall >= target and trial.full_fraction == 1.0:
                if best is None or trial.cost < best.cost:
                    best = trial
                break  # the rest of this chain costs more
            if best is not None and trial.cost > best.cost:
                break  # already dearer than a setting that qualifies
    return best, trials


def split_queries(
    queries: np.ndarray, rng: np.random.Generator, n_tuning: int, n_held_out: int
) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random samples of ``queries``: one to tune on, one to report on (half each if short)."""
    n = len(queries)
    order = rng.permutation(n)
    n_tuning = min(n_tuning, n // 2) if n < n_tuning + n_held_out else n_tuning
    n_held_out = min(n_held_out, n - n_tuning)
    tuning = queries[np.sort(order[:n_tuning])]
    held_out = queries[np.sort(order[n_tuning : n_tuning + n_held_out])]
    return np.ascontiguousarray(tuning, dtype=np.float32), np.ascontiguousarray(held_out, dtype=np.float32)


@dataclass
class Tuned:
    """An index of one kind, its chosen search parameters and what they reach."""

    kind: IndexKind
    factory: str
    index: faiss.Index
    params: dict[str, int]
    tuning_recall: float
    recall: float  # on the held-out queries
    full_fraction: float  # held out
    search_ms: float  # median CPU time of one query at SERVING_K on one thread, at ``params`` (0: not timed)


def single_query_ms(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[list[float], list[float]]:
    """One query at a time on one FAISS thread, as a serving request searches: wall-clock and this thread's
    CPU time per query, in ms (on a loaded machine the wall-clock tail is mostly time spent preempted)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for q in queries[:20]:  # warm the caches
            index.search(q[None], k)
        wall, cpu = [], []
        for q in queries:
            started, started_cpu = time.perf_counter(), time.thread_time()
            index.search(q[None], k)
            cpu.append((time.thread_time() - started_cpu) * 1000)
            wall.append((time.perf_counter() - started) * 1000)
        return wall, cpu
    finally:
        faiss.omp_set_num_threads(before)


def tune_kind(
    kind: IndexKind,
    vectors: np.ndarray,
    rng: np.random.Generator,
    tuning: np.ndarray,
    tuning_truth: Truth,
    held_out: np.ndarray,
    held_out_truth: Truth,
    full_k: int,
    recall_target: float,
) -> Tuned | str:
    """The index of ``kind`` tuned on ``tuning`` and checked on ``held_out``, or why it missed the target."""
    n, dim = vectors.shape
    factory = factory_string(kind, n, dim)
    k = tuning_truth.k
    index = train_and_add(kind, vectors, rng)
    chosen, trials = tune(index, kind, tuning, tuning_truth, full_k, recall_target + TUNING_MARGIN)
    if chosen is None:
        best = max(trials, key=lambda t: (t.full_fraction == 1.0, t.recall))
        return (
            f"expected a {factory} setting with recall@{k} >= {recall_target + TUNING_MARGIN} and full lists at "
            f"k={full_k} on the tuning queries, but the best of {len(trials)} found recall {best.recall:.4f} and "
            f"{best.full_fraction:.1%} full lists at {search_params_string(best.params)}"
        )
    report = measure(index, kind, chosen.params, held_out, held_out_truth, full_k)
    log.info(
        "%s: chose %s (tuning recall %.4f, cost %.0f); held-out recall@%d %.4f, full lists at k=%d %.4f",
        factory,
        search_params_string(chosen.params),
        chosen.recall,
        chosen.cost,
        k,
        report.recall,
        full_k,
        report.full_fraction,
    )
    if report.recall < recall_target:
        return (
            f"expected held-out recall@{k} >= {recall_target}, but found {report.recall:.4f} at {factory} "
            f"{search_params_string(chosen.params)} (tuning recall {chosen.recall:.4f}): tune on more queries"
        )
    apply_search_params(index, chosen.params)
    _, cpu = single_query_ms(index, tuning[:N_TIMED_QUERIES], min(SERVING_K, n))
    search_ms = float(np.median(cpu))
    log.info(
        "%s at %s: %.3f ms CPU per query at k=%d", factory, search_params_string(chosen.params), search_ms, SERVING_K
    )
    return Tuned(kind, factory, index, chosen.params, chosen.recall, report.recall, report.full_fraction, search_ms)


def fastest(
    kinds: tuple[IndexKind, ...],
    vectors: np.ndarray,
    rng: np.random.Generator,
    tuning: np.ndarray,
    held_out: np.ndarray,
    full_k: int,
    recall_target: float,
) -> Tuned:
    """Of ``kinds``, each built and tuned, the one whose chosen setting searches fastest: measured, not by the
    grid's cost figure, which counts distance computations and so undercounts a graph quantizer's walk (at
    efSearch 1,024 over 4,096 centroids: 1,500 distances, but 0.3 ms of heap and visited-set work per query,
    ten times an exact scan of all 4,096)."""
    k = min(RECALL_K, len(vectors))
    tuning_truth, held_out_truth = exact_neighbours(vectors, tuning, k), exact_neighbours(vectors, held_out, k)
    chosen: Tuned | None = None
    failures: list[str] = []
    for kind in kinds:
        tuned = tune_kind(kind, vectors, rng, tuning, tuning_truth, held_out, held_out_truth, full_k, recall_target)
        if isinstance(tuned, str):
            failures.append(tuned)
            log.warning("%s", tuned)
        elif chosen is None or tuned.search_ms < chosen.search_ms:
            chosen = tuned  # the dearer index is dropped at once: at most two in memory
    if chosen is None:
        raise IndexBuildError("; ".join(failures))
    return chosen


def build_index(
    item_embeddings: np.ndarray,
    item_ids: list[str],
    model_version: str,
    path: Path,
    queries: np.ndarray | None = None,
    exact_threshold: int = EXACT_THRESHOLD,
    recall_target: float = RECALL_TARGET,
    seed: int = 0,
    kind: IndexKind | None = None,
    full_k: int = FULL_K,
    n_tuning_queries: int = N_TUNING_QUERIES,
    n_held_out_queries: int = N_HELD_OUT_QUERIES,
) -> IndexManifest:
    """Write ``path`` (the index) and ``path.with_suffix('.json')`` (manifest + row -> item id).

    ``queries`` are user vectors (the pipeline passes every user's embedding); without them, item vectors
    stand in. ``kind`` None means exact below ``exact_threshold`` items and from there on the fastest of
    ``LARGE_KINDS`` that meets the target, each built and tuned (the build fails, saying what each reached,
    if none does)."""
    started = time.perf_counter()
    vectors = np.ascontiguousarray(item_embeddings, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(item_ids):
        raise IndexBuildError(
            f"expected item_embeddings of shape [{len(item_ids)}, dim], but found {list(vectors.shape)}"
        )
    if not np.isfinite(vectors).all():
        raise IndexBuildError("expected finite item embeddings, but found NaN or inf")
    n, dim = vectors.shape
    kinds: tuple[IndexKind, ...] = (kind,) if kind is not None else ("flat",) if n < exact_threshold else LARGE_KINDS
    rng = np.random.default_rng(seed)
    if queries is None:
        queries = vectors[rng.choice(n, size=min(n, n_tuning_queries + n_held_out_queries), replace=False)]
    tuning, held_out = split_queries(np.asarray(queries), rng, n_tuning_queries, n_held_out_queries)
    full_k = min(full_k, n)
    if kinds == ("flat",):
        chosen = Tuned(
            "flat", factory_string("flat", n, dim), train_and_add("flat", vectors, rng), {}, 1.0, 1.0, 1.0, 0.0
        )
    else:
        chosen = fastest(kinds, vectors, rng, tuning, held_out, full_k, recall_target)
    index, factory, params = chosen.index, chosen.factory, chosen.params
    tuning_recall, recall, full_fraction = chosen.tuning_recall, chosen.recall, chosen.full_fraction
    total_s = time.perf_counter() - started
    manifest = IndexManifest(
        model_version=model_version,
        dim=dim,
        metric="inner_product",
        n_items=n,
        index_factory=factory,
        nprobe=params.get("nprobe", 0),
        recall_at_100=round(recall, 4),
        search_params=params,
        recall_at_100_tuning=round(tuning_recall, 4),
        full_length_k=full_k,
        full_length_fraction=round(full_fraction, 4),
        build_seconds=round(total_s, 1),
    )
    log.info(
        "index %s over %d items: built and tuned in %.1f s (%s)", factory, n, total_s, search_params_string(params)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    write_json(path.with_suffix(".json"), asdict(manifest) | {"item_ids": list(item_ids)})
    return manifest
