"""Pre-compute job: top-N for every user by FAISS batch search + batch ranking (``python -m export
precompute``), written to the ``PrecomputedStore`` with a TTL and metadata.

``--shard-index i --shard-count n`` takes user rows r with r % n == i, so the pods of a Kubernetes
Indexed Job split the users without talking to each other. Inside a pod, ``precompute_processes`` runs one
process per core, process w of W taking the pod's rows r with r % (n * W) == i + n * w; each process holds
only its own users (ids, embeddings, features, seen items), and the item tables, the index and the ranker.
A checkpoint per (version, shard) makes a restarted pod resume (a restart with another process count
starts its shard over: harmless, every write is a SET of the same value).

Where the time goes (measured, docs/BENCHMARKS.md "Pre-compute at 1M users"): ranking, 77-96% of it. So
a batch of users is searched in a few FAISS calls (one per depth group), seen items are dropped with array
operations, and the candidates are ranked by default with the model's weights regrouped
(``export.ranker_factored``: a third of the arithmetic, one ONNX Runtime call per user, the same scores to
~1e-7), with ``--ranker bf16`` by the same arithmetic with its big product in bf16 (``export.ranker_bf16``:
~1.2x the users per CPU-second where the CPU has native bf16, scores within ~5e-4) or, with ``--ranker onnx``,
by ONNX Runtime in chunks of ``rank_rows`` rows (fastest per row at about a thousand rows; at 51,200 rows per
call, as one call per 256 users made, it ran a third slower); the Redis writes of one batch go out while the
next batch is computed.

``offline_top_n`` computes one user's list on its own, the way the online path does (search depth
``n_candidates`` + the user's seen items): the reference the job (and the online path) is checked against.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
from tqdm import tqdm

from export.artifacts import Bundle
from export.errors import ExportError
from export.evaluate import default_context
from export.history import distinct_per_row, read_arrays
from orchestrator.ranking import RankingRequest, check_scores
from orchestrator.retrieval import FaissRetriever
from orchestrator.store import Recommendations, keys
from orchestrator.store.backend import Backend, Command
from orchestrator.store.precomputed import RedisPrecomputedStore

log = logging.getLogger(__name__)

# Scores a batch of named ranker tensors synchronously (OnnxRanker.run): the fast path offline.
BatchScoreFn = Callable[[dict[str, np.ndarray]], np.ndarray]


class BatchRanker(Protocol):
    """What pre-compute ranks with: a model version and a synchronous batch ``run`` (OnnxRanker)."""

    model_version: str

    def run(self, tensors: dict[str, np.ndarray]) -> np.ndarray: ...


RANKERS = ("factored", "bf16", "onnx")


@dataclass(frozen=True)
class PrecomputeConfig:
    top_n: int = 50
    """Length of each user's stored list."""
    n_candidates: int = 200
    """Candidates retrieved (after removing seen items) and ranked per user."""
    batch_users: int = 1024
    """Users per FAISS search, Redis write and checkpoint."""
    rank_rows: int = 1024
    """Rows (user, candidate pairs) per ONNX Runtime call (``ranker="onnx"``): fastest per row near a thousand."""
    ttl_s: int = 7 * 86400
    """Lifetime of a stored list; the job reruns well within it."""
    shard_index: int = 0
    shard_count: int = 1
    ranker: str = "factored"
    """How ``precompute_processes`` ranks: ``factored`` (the ONNX model's weights, regrouped: about 1.8x the
    rows/s, checked against ONNX Runtime first), ``bf16`` (the same with its big product in bf16, for CPUs
    with native bf16: scores within ~5e-4, ``export.ranker_bf16``) or ``onnx`` (ONNX Runtime on the model as
    exported)."""

    def validate(self) -> None:
        if not 1 <= self.top_n <= self.n_candidates:
            raise ValueError(f"top_n must be in 1..n_candidates ({self.n_candidates}), got {self.top_n}")
        if self.batch_users < 1 or self.rank_rows < 1 or self.ttl_s < 1:
            raise ValueError(
                "batch_users, rank_rows and ttl_s must be integers >= 1, got "
                f"{self.batch_users}, {self.rank_rows}, {self.ttl_s}"
            )
        if self.ranker not in RANKERS:
            raise ValueError(f"ranker must be one of {list(RANKERS)}, got {self.ranker!r}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(
                f"shard_index must be in 0..shard_count-1 ({self.shard_count - 1}), got {self.shard_index}"
            )

    @property
    def shard(self) -> str:
        return f"{self.shard_index}of{self.shard_count}"


def shard_rows(n_users: int, shard_index: int, shard_count: int) -> np.ndarray:
    """The bundle rows of one shard: r % shard_count == shard_index, ascending."""
    return np.arange(shard_index, n_users, shard_count, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# The per-user reference


class Candidates:
    """Bundle-derived lookups for ``offline_top_n``: one user at a time, as the online path computes it."""

    def __init__(self, bundle: Bundle, retriever: FaissRetriever, cfg: PrecomputeConfig) -> None:
        self.bundle = bundle
        self.retriever = retriever
        self.cfg = cfg
        self.item_row = {item: r for r, item in enumerate(bundle.item_ids)}
        self.user_row = {user: r for r, user in enumerate(bundle.user_ids)}
        self.context = default_context(1)[0]

    def seen(self, row: int) -> set[str]:
        return set(self.bundle.user_history[self.bundle.user_ids[row]])

    def depth(self, row: int) -> int:
        """The online path's retrieval depth: enough to leave ``n_candidates`` after this user's seen items."""
        return min(len(self.bundle.item_ids), self.cfg.n_candidates + len(self.seen(row)))

    def for_user(self, row: int) -> list[str]:
        (found,), _ = self.retriever.search_sync(self.bundle.user_embeddings[row : row + 1], self.depth(row))
        seen = self.seen(row)
        return [i for i in found if i not in seen][: self.cfg.n_candidates]

    def for_users(self, rows: Sequence[int]) -> list[list[str]]:
        return [self.for_user(row) for row in rows]

    def request(self, row: int, candidates: list[str]) -> RankingRequest:
        item_rows = [self.item_row[i] for i in candidates]
        b = self.bundle
        return RankingRequest(
            user_embedding=b.user_embeddings[row],
            user_features=b.user_features[row],
            item_embeddings=b.item_embeddings[item_rows],
            item_features=b.item_features[item_rows],
            context_features=self.context,
        )


def top_n(candidates: Sequence[str], scores: np.ndarray, n: int) -> tuple[list[str], list[float]]:
    """Best ``n`` by score; ties keep retrieval order (stable sort), so the result is deterministic."""
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")[:n]
    return [candidates[i] for i in order], [float(scores[i]) for i in order]


def offline_top_n(candidates: Candidates, row: int, score: BatchScoreFn) -> tuple[list[str], list[float]]:
    """One user's list, computed alone: retrieve, drop seen items, rank, keep the best ``top_n``."""
    items = candidates.for_user(row)
    request = candidates.request(row, items)
    scores = check_scores(score(request.tensors()), request.n_candidates, "offline")
    return top_n(items, scores, candidates.cfg.top_n)


# ---------------------------------------------------------------------------------------------------------
# One shard's users and the item tables, as arrays


@dataclass(frozen=True)
class ItemTables:
    ids: list[str]
    embeddings: np.ndarray  # float32 [n_items, dim]
    features: np.ndarray  # int64 [n_items, width]

    @classmethod
    def of(cls, bundle: Bundle) -> ItemTables:
        return cls(bundle.item_ids, bundle.item_embeddings, bundle.item_features)

    @classmethod
    def read(cls, path: Path) -> ItemTables:
        return cls(
            orjson.loads((path / "items.json").read_bytes()),
            np.load(path / "item_embeddings.npy"),
            np.load(path / "item_features.npy"),
        )


@dataclass(frozen=True)
class ShardUsers:
    """One shard's users: their ids, bundle rows, embeddings and features, and their seen items as CSR
    (``seen_items[seen_indptr[u]:seen_indptr[u + 1]]`` are user u's distinct item rows). Nothing of any
    other user."""

    ids: list[str]
    rows: np.ndarray  # int64 [n]
    embeddings: np.ndarray  # float32 [n, dim]
    features: np.ndarray  # int64 [n, width]
    seen_indptr: np.ndarray  # int64 [n + 1]
    seen_items: np.ndarray  # int64 [seen pairs]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, part: slice | np.ndarray) -> ShardUsers:
        """A sub-range (slice) or any subset (indices) of these users, with their seen items."""
        picked = np.arange(len(self))[part]
        counts = np.diff(self.seen_indptr)[picked]
        indptr = np.zeros(len(picked) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        starts = np.repeat(self.seen_indptr[:-1][picked] - indptr[:-1], counts)
        items = self.seen_items[starts + np.arange(indptr[-1])]
        return ShardUsers(
            [self.ids[i] for i in picked.tolist()],
            self.rows[picked],
            self.embeddings[picked],
            self.features[picked],
            indptr,
            items,
        )

    @classmethod
    def of(cls, bundle: Bundle, rows: np.ndarray) -> ShardUsers:
        """The users at ``rows`` of an in-memory bundle."""
        history = bundle.user_history
        indptr, items = distinct_per_row(history.indptr, history.item_rows, rows)
        ids = [bundle.user_ids[r] for r in rows.tolist()]
        return cls(
            ids, np.asarray(rows, np.int64), bundle.user_embeddings[rows], bundle.user_features[rows], indptr, items
        )

    @classmethod
    def read(cls, path: Path, rows: np.ndarray) -> ShardUsers:
        """The users at ``rows`` of the bundle at ``path``: every table, the history included, is
        memory-mapped and only these rows copied. The id list is the one read whose memory follows the
        bundle's users, not the shard's."""
        ids_all = orjson.loads((path / "users.json").read_bytes())
        ids = [ids_all[r] for r in rows.tolist()]
        del ids_all
        embeddings = np.load(path / "user_embeddings.npy", mmap_mode="r")
        features = np.load(path / "user_features.npy", mmap_mode="r")
        indptr, items = distinct_per_row(*read_arrays(path), rows)
        return cls(
            ids,
            np.asarray(rows, np.int64),
            np.ascontiguousarray(embeddings[rows]),
            np.ascontiguousarray(features[rows]),
            indptr,
            items,
        )


# ---------------------------------------------------------------------------------------------------------
# The batched computation


def prefix_stable(index: Any) -> bool:
    """Whether a deeper search of ``index`` returns a shallower one's results first: exact (Flat) and IVF
    indexes (coarse quantizer included: it searches ``nprobe`` lists whatever k is), not HNSW or refinement."""
    import faiss

    return isinstance(faiss.downcast_index(index), faiss.IndexFlat | faiss.IndexIVF)


@dataclass
class BatchResult:
    """Each user's best ``top_n`` item rows (-1 past the end of a short list) and their scores."""

    items: np.ndarray  # int64 [n_users, top_n]
    scores: np.ndarray  # float32 [n_users, top_n]


class Scorer(Protocol):
    """Scores each user's candidates, given as rows of the item tables (``FactoredScorer``, ``Bf16Scorer``)."""

    def score(
        self,
        user_embeddings: np.ndarray,
        user_features: np.ndarray,
        item_embeddings: np.ndarray,
        item_features: np.ndarray,
        candidates: np.ndarray,
    ) -> np.ndarray: ...


class CandidateRanker(Protocol):
    """Scores a batch's candidates: float32 [n_users, n_candidates], -inf where a slot holds no item (-1)."""

    def __call__(self, users: ShardUsers, candidates: np.ndarray) -> np.ndarray: ...


class OnnxCandidates:
    """The exported model as it is (ONNX Runtime): one ranker call per ``rank_rows`` (user, item) rows."""

    def __init__(self, items: ItemTables, run: BatchScoreFn, rank_rows: int) -> None:
        self.items = items
        self.run = run
        self.rank_rows = rank_rows
        self.context = np.ascontiguousarray(default_context(rank_rows))

    def __call__(self, users: ShardUsers, candidates: np.ndarray) -> np.ndarray:
        user_of, slot = np.nonzero(candidates >= 0)
        item_rows = candidates[user_of, slot]
        flat = np.empty(len(item_rows), dtype=np.float32)
        step = self.rank_rows
        for lo in range(0, len(item_rows), step):
            u, i = user_of[lo : lo + step], item_rows[lo : lo + step]
            tensors: dict[str, np.ndarray] = {
                "user_embedding": np.ascontiguousarray(users.embeddings[u], dtype=np.float32),
                "item_embedding": np.ascontiguousarray(self.items.embeddings[i], dtype=np.float32),
                "user_features": np.ascontiguousarray(users.features[u], dtype=np.int64),
                "item_features": np.ascontiguousarray(self.items.features[i], dtype=np.int64),
                "context_features": self.context[: len(u)],
            }
            flat[lo : lo + len(u)] = check_scores(self.run(tensors), len(u), "batch ranker")
        scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
        scores[user_of, slot] = flat
        return scores


class FactoredCandidates:
    """The same model regrouped (``export.ranker_factored``): the user's part of every product computed once,
    about a third of the arithmetic per row, one ONNX Runtime call per user (the graph Triton's cpu profile
    runs), or with ``bf16`` its big product in bf16 (``export.ranker_bf16``). Built from the ONNX file and
    checked against ONNX Runtime on rows of the job's own users and items before use (``FactoredParityError``
    past 1e-5; with ``bf16``, ``Bf16ToleranceError`` past ``BF16_TOLERANCE`` as well)."""

    def __init__(self, items: ItemTables, scorer: Scorer, parity_max_abs_diff: float) -> None:
        self.items = items
        self.item_embeddings = np.asarray(items.embeddings, dtype=np.float32)
        self.item_features = np.asarray(items.features, dtype=np.int64)
        self.scorer = scorer
        self.parity_max_abs_diff = parity_max_abs_diff

    @classmethod
    def build(
        cls, items: ItemTables, model_path: Path, run: BatchScoreFn, parity_users: ShardUsers, bf16: bool = False
    ) -> FactoredCandidates:
        """Read the weights, build the graph, and compare with ``run`` (ONNX Runtime) on 512 rows of
        ``parity_users`` x random items; with ``bf16``, the bf16 scorer on the same rows too."""
        from export.ranker_bf16 import Bf16Scorer, check_bf16, warn_unless_native
        from export.ranker_factored import FactoredRanker, FactoredScorer, check_parity

        ranker = FactoredRanker.from_onnx(model_path)
        fp32 = FactoredScorer(ranker, default_context(1))
        scorer: Scorer = fp32
        if bf16:
            warn_unless_native()
            scorer = Bf16Scorer(ranker, default_context(1))
        if not len(parity_users):
            return cls(items, scorer, 0.0)  # no users: nothing will be scored
        rng = np.random.default_rng(0)
        n = 512
        u, i = rng.integers(0, len(parity_users), n), rng.integers(0, len(items.ids), n)
        rows: dict[str, np.ndarray] = {
            "user_embedding": np.ascontiguousarray(parity_users.embeddings[u], dtype=np.float32),
            "item_embedding": np.ascontiguousarray(items.embeddings[i], dtype=np.float32),
            "user_features": np.ascontiguousarray(parity_users.features[u], dtype=np.int64),
            "item_features": np.ascontiguousarray(items.features[i], dtype=np.int64),
            "context_features": default_context(n),
        }
        reference = run(rows)
        diff = check_parity(fp32, reference, rows)  # the architecture, to fp32 rounding
        if isinstance(scorer, Bf16Scorer):
            diff = check_bf16(scorer, reference, rows)
        return cls(items, scorer, diff)

    def __call__(self, users: ShardUsers, candidates: np.ndarray) -> np.ndarray:
        scores = self.scorer.score(
            users.embeddings, users.features, self.item_embeddings, self.item_features, candidates
        )
        scores[candidates < 0] = -np.inf
        return scores


# Flat and IVF searches of a batch go in groups of depth rounded up to this (BatchScorer.search).
DEPTH_STEP = 64


class BatchScorer:
    """Top-N for many users at once: a few FAISS searches for the batch (``search``), seen items dropped with
    array operations, the candidates ranked by ``rank``, top-N by a stable sort per row. Equal to
    ``offline_top_n`` for each user (within ranking ties): the same candidates in the same retrieval order,
    scored by the same model, sorted the same way."""

    def __init__(self, items: ItemTables, index: Any, rank: CandidateRanker, cfg: PrecomputeConfig) -> None:
        self.items = items
        self.index = index
        self.rank = rank
        self.cfg = cfg
        self.n_items = len(items.ids)
        self.prefix_stable = prefix_stable(index)

    def depths(self, users: ShardUsers) -> np.ndarray:
        """Each user's search depth, as the online path and ``Candidates.depth`` choose it: enough to leave
        ``n_candidates`` after their own seen items."""
        return np.minimum(self.n_items, self.cfg.n_candidates + np.diff(users.seen_indptr))

    def search(self, users: ShardUsers) -> np.ndarray:
        """int64 [n_users, deepest searched depth] item rows, -1 past each user's own results.

        On Flat and IVF indexes a deeper search returns the shallower one's results first (the same lists
        are scanned whatever k is), so users go in groups of their depth rounded up to ``DEPTH_STEP``, each
        group in one search at that depth: few searches per batch, and the batch's longest histories do not
        set everyone's k (FAISS keeps a heap of k results per query). On an index where k changes the search
        itself (HNSW: ef = max(efSearch, k); a refinement step re-ranks k * k_factor), users are searched in
        groups of equal depth, so each gets what a search at their own depth finds."""
        queries = np.ascontiguousarray(users.embeddings, dtype=np.float32)
        depths = self.depths(users)
        if self.prefix_stable:
            depths = np.minimum(self.n_items, -(-depths // DEPTH_STEP) * DEPTH_STEP)
        found = np.full((len(users), int(depths.max())), -1, dtype=np.int64)
        for depth in np.unique(depths).tolist():
            group = np.flatnonzero(depths == depth)
            found[group, :depth] = self.index.search(queries[group], depth)[1]
        return found

    def candidates(self, users: ShardUsers) -> np.ndarray:
        """int64 [n_users, n_candidates]: retrieval order, seen items dropped, -1 past the end."""
        found = self.search(users)
        n = len(found)
        keep = found >= 0
        if len(users.seen_items):
            # (user, item) pairs as one int64 key each, so one isin finds every seen candidate of the batch.
            owner = np.repeat(np.arange(n, dtype=np.int64), np.diff(users.seen_indptr))
            seen_keys = owner * self.n_items + users.seen_items
            found_keys = np.arange(n, dtype=np.int64)[:, None] * self.n_items + found
            keep &= ~np.isin(found_keys, seen_keys)
        position = np.cumsum(keep, axis=1)
        keep &= position <= self.cfg.n_candidates
        out = np.full((n, self.cfg.n_candidates), -1, dtype=np.int64)
        user_of, col = np.nonzero(keep)
        out[user_of, position[user_of, col] - 1] = found[user_of, col]
        return out

    def __call__(self, users: ShardUsers) -> BatchResult:
        candidates = self.candidates(users)
        scores = self.rank(users, candidates)
        # Stable: ties keep retrieval order, as top_n does; -inf (no candidate) sorts last.
        order = np.argsort(-scores, axis=1, kind="stable")[:, : self.cfg.top_n]
        best = np.take_along_axis(candidates, order, axis=1)
        best_scores = np.take_along_axis(scores, order, axis=1)
        best[~np.isfinite(best_scores)] = -1
        return BatchResult(best, best_scores)

    def recommendations(self, users: ShardUsers, result: BatchResult, version: str) -> dict[str, Recommendations]:
        now = time.time()
        ids = self.items.ids
        recs = {}
        for user, row, row_scores in zip(users.ids, result.items.tolist(), result.scores.tolist(), strict=True):
            n = next((j for j, r in enumerate(row) if r < 0), len(row))
            recs[user] = Recommendations(tuple(ids[r] for r in row[:n]), tuple(row_scores[:n]), version, now)
        return recs


# ---------------------------------------------------------------------------------------------------------
# The job: one shard in one process, and a pod's shard over one process per core


@dataclass
class PrecomputeReport:
    version: str
    shard: str
    users: int
    skipped_users: int
    seconds: float
    cpu_seconds: float = 0.0
    """CPU time (user + system, every thread) of the batches, summed over processes: users per core-second
    is ``(users - skipped_users) / cpu_seconds``. Setup (reading the shard, index and ranker) is not in it."""
    setup_seconds: float = 0.0
    """Of ``seconds``: reading the shard, the index and the ranker before the first batch."""
    processes: int = 1
    per_process: list[PrecomputeReport] = field(default_factory=list)

    @property
    def users_per_s(self) -> float:
        done = self.users - self.skipped_users
        return done / self.seconds if self.seconds else 0.0


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _ranker_run(ranker: object) -> BatchScoreFn:
    run = getattr(ranker, "run", None)
    if run is None:
        raise TypeError(
            f"pre-compute ranks in process, in batches of many users, and needs a ranker with a synchronous "
            f"batch run(tensors) (OnnxRanker), but found {type(ranker).__name__}"
        )
    return run


async def precompute_shard(
    backend: Backend,
    users: ShardUsers,
    scorer: BatchScorer,
    version: str,
    cfg: PrecomputeConfig,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> PrecomputeReport:
    """Pre-compute ``users`` (the shard ``cfg.shard``), resuming after its checkpoint. Batch i+1 is computed
    in a worker thread (FAISS and ONNX Runtime release the GIL) while batch i is written; the checkpoint
    moves only after a batch's writes are acknowledged, in order."""
    cfg.validate()
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    store = RedisPrecomputedStore(backend, version)  # the version's own lists, beside the others
    ckpt = keys.checkpoint(version, f"precompute:{cfg.shard}")
    raw = await backend.control(Command("GET", ckpt))
    done = min(int(raw), len(users)) if raw is not None else 0
    skipped = done

    def compute(lo: int) -> tuple[int, dict[str, Recommendations]]:
        part = users[lo : lo + cfg.batch_users]
        return lo + len(part), scorer.recommendations(part, scorer(part), version)

    with tqdm(total=len(users), initial=done, desc=f"precompute {cfg.shard}", unit="user", disable=not progress) as bar:
        pending = asyncio.ensure_future(asyncio.to_thread(compute, done)) if done < len(users) else None
        try:
            while pending is not None:
                end, recs = await pending
                pending = asyncio.ensure_future(asyncio.to_thread(compute, end)) if end < len(users) else None
                await store.set_recs(recs, cfg.ttl_s)
                await backend.control(Command("SET", ckpt, (end,)))
                bar.update(end - done)
                done = end
                if on_batch is not None:
                    on_batch(done)
        finally:
            if pending is not None:  # a failed write or hook: let the computation in flight finish, unused
                await asyncio.gather(pending, return_exceptions=True)
    return PrecomputeReport(
        version,
        cfg.shard,
        len(users),
        skipped,
        time.perf_counter() - started,
        cpu_seconds=_cpu_seconds() - cpu_started,
    )


async def precompute(
    backend: Backend,
    bundle: Bundle,
    retriever: FaissRetriever,
    ranker: BatchRanker,
    cfg: PrecomputeConfig,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> PrecomputeReport:
    """Pre-compute the shard ``cfg.shard`` of an in-memory bundle in this process."""
    cfg.validate()
    started = time.perf_counter()
    score = _ranker_run(ranker)
    users = ShardUsers.of(bundle, shard_rows(len(bundle.user_ids), cfg.shard_index, cfg.shard_count))
    items = ItemTables.of(bundle)
    scorer = BatchScorer(items, retriever.index, OnnxCandidates(items, score, cfg.rank_rows), cfg)
    setup = time.perf_counter() - started
    report = await precompute_shard(backend, users, scorer, ranker.model_version, cfg, progress, on_batch)
    report.seconds += setup
    report.setup_seconds = setup
    return report


# ----- one process per core


@dataclass(frozen=True)
class BackendSpec:
    """How a worker process opens its own connections (a backend does not cross a process boundary)."""

    urls: tuple[str, ...]
    cluster: bool = False
    timeout_ms: float = 5000.0

    async def open(self) -> Backend:
        """The shards of one ring, or (``cluster``) the Redis Cluster one seed URL names."""
        if self.cluster:
            from orchestrator.store.cluster import ClusterBackend

            if len(self.urls) != 1:
                raise ValueError(f"a cluster takes one seed URL, got {len(self.urls)}")
            return await ClusterBackend.connect(self.urls[0], timeout_ms=self.timeout_ms)
        from orchestrator.store.sharded import ShardedBackend

        return ShardedBackend.from_urls(list(self.urls), timeout_ms=self.timeout_ms)


@dataclass(frozen=True)
class _WorkerJob:
    worker: int
    bundle_path: Path
    index_path: Path
    model_path: Path
    version: str
    backend: BackendSpec
    cfg: PrecomputeConfig  # the worker's own sub-shard
    users: ShardUsers


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU limit (a pod's
    ``limits.cpu``), which ``os.cpu_count`` does not see."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(-(-int(quota) // int(period)))))
    except (OSError, ValueError):
        pass
    return cores


def _worker(job: _WorkerJob, events: Any) -> None:
    """One process: its users, the items, the index and a one-thread ranker; progress and the report go
    back over ``events``."""
    try:
        import faiss

        from orchestrator.ranking.onnx_ranker import OnnxRanker

        faiss.omp_set_num_threads(1)  # one process per core: no thread pools inside
        setup_started = time.perf_counter()
        items = ItemTables.read(job.bundle_path)
        retriever = FaissRetriever(job.index_path)
        ranker = OnnxRanker(job.model_path, job.version, intra_op_threads=1)
        rank: CandidateRanker
        if job.cfg.ranker in ("factored", "bf16"):
            rank = FactoredCandidates.build(items, job.model_path, ranker.run, job.users, job.cfg.ranker == "bf16")
        else:
            rank = OnnxCandidates(items, ranker.run, job.cfg.rank_rows)
        scorer = BatchScorer(items, retriever.index, rank, job.cfg)
        setup = time.perf_counter() - setup_started

        async def run() -> PrecomputeReport:
            backend = await job.backend.open()
            last = 0

            def on_batch(done: int) -> None:
                nonlocal last
                events.put(("progress", job.worker, done - last))
                last = done

            try:
                report = await precompute_shard(backend, job.users, scorer, job.version, job.cfg, False, on_batch)
            finally:
                await backend.aclose()
            events.put(("progress", job.worker, report.users - last))  # the bar counts resumed users as done
            return report

        report = asyncio.run(run())
        report.setup_seconds = setup
        report.seconds += setup
        events.put(("done", job.worker, report))
    except BaseException as exc:  # reported to the parent, which raises it
        events.put(("error", job.worker, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


_ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class PrecomputeWorkerError(ExportError):
    """A worker process failed or died; each failure's traceback (or exit code) is in the message."""

    def __init__(self, failures: Sequence[str]) -> None:
        super().__init__(
            f"expected every pre-compute process to report its users done, but found {len(failures)} that did "
            f"not: {'; '.join(failures)}; rerun the same command: it resumes after each process's checkpoint"
        )


async def precompute_processes(
    redis: Sequence[str] | BackendSpec,
    bundle_path: Path,
    index_path: Path,
    model_path: Path,
    cfg: PrecomputeConfig,
    processes: int,
    progress: bool = True,
) -> PrecomputeReport:
    """Pre-compute the pod's shard ``cfg.shard`` of the bundle at ``bundle_path`` with ``processes`` worker
    processes (one per core). This process reads the shard's users once and hands each worker only its own;
    the workers open their own connections (``redis``: the shards' URLs, or a ``BackendSpec``)."""
    cfg.validate()
    if processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes}")
    started = time.perf_counter()
    spec = redis if isinstance(redis, BackendSpec) else BackendSpec(tuple(redis))
    manifest = orjson.loads((bundle_path / "manifest.json").read_bytes())
    version = str(manifest["model_version"])
    n_users = len(np.load(bundle_path / "user_embeddings.npy", mmap_mode="r"))
    users = ShardUsers.read(bundle_path, shard_rows(n_users, cfg.shard_index, cfg.shard_count))
    read_seconds = time.perf_counter() - started
    context = mp.get_context("spawn")  # no fork: ONNX Runtime and OpenMP thread pools do not survive one
    events = context.Queue()
    jobs = []
    for w in range(processes):
        sub = PrecomputeConfig(
            cfg.top_n,
            cfg.n_candidates,
            cfg.batch_users,
            cfg.rank_rows,
            cfg.ttl_s,
            shard_index=cfg.shard_index + cfg.shard_count * w,
            shard_count=cfg.shard_count * processes,
            ranker=cfg.ranker,
        )
        # Pod rows i, i+n, i+2n, ...: every W-th of them from the w-th is r % (n*W) == i + n*w.
        mine = users[np.arange(w, len(users), processes)]
        jobs.append(_WorkerJob(w, bundle_path, index_path, model_path, version, spec, sub, mine))
    del users
    workers = [
        context.Process(target=_worker, args=(job, events), name=f"precompute-{w}") for w, job in enumerate(jobs)
    ]
    total = sum(len(job.users) for job in jobs)
    del jobs
    # One thread per process in every pool the workers load (OpenBLAS for the factored ranker, OpenMP for
    # FAISS): read at import, so set in the environment they start with.
    saved = {name: os.environ.get(name) for name in _ONE_THREAD}
    os.environ.update(dict.fromkeys(_ONE_THREAD, "1"))
    try:
        for p in workers:
            p.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    reports: dict[int, PrecomputeReport] = {}
    errors: list[str] = []
    try:
        with tqdm(total=total, desc=f"precompute {cfg.shard} x{processes}", unit="user", disable=not progress) as bar:
            while len(reports) + len(errors) < processes:
                try:
                    kind, w, value = await asyncio.to_thread(events.get, True, 1.0)
                except queue.Empty:
                    dead = [p for i, p in enumerate(workers) if not p.is_alive() and i not in reports]
                    if dead and events.empty():
                        errors.extend(f"{p.name} exited with code {p.exitcode} before reporting" for p in dead)
                        break
                    continue
                if kind == "progress":
                    bar.update(value)
                elif kind == "done":
                    reports[w] = value
                else:
                    errors.append(f"precompute-{w}: {value}")
    finally:
        for p in workers:
            if errors and p.is_alive():
                p.terminate()
            p.join()
    if errors:
        raise PrecomputeWorkerError(errors)
    parts = [reports[w] for w in range(processes)]
    return PrecomputeReport(
        version,
        cfg.shard,
        sum(r.users for r in parts),
        sum(r.skipped_users for r in parts),
        time.perf_counter() - started,
        cpu_seconds=sum(r.cpu_seconds for r in parts),
        setup_seconds=read_seconds + max(r.setup_seconds for r in parts),
        processes=processes,
        per_process=parts,
    )
