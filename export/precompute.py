"""Pre-compute job: top-N for every user by FAISS batch search + batch ranking (``python -m export
precompute``), written to the ``PrecomputedStore`` with a TTL and metadata.

``--shard-index i --shard-count n`` takes user rows r with r % n == i, so the pods of a Kubernetes
Indexed Job split the users without talking to each other. A checkpoint per (version, shard) makes a
restarted pod resume. ``offline_top_n`` computes one user's list on its own: the reference the job (and
the online path) is checked against.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from export.artifacts import Bundle
from export.evaluate import default_context
from orchestrator.ranking import Ranker, RankingRequest, check_scores
from orchestrator.retrieval import FaissRetriever
from orchestrator.store import Recommendations, keys
from orchestrator.store.backend import Backend, Command
from orchestrator.store.precomputed import RedisPrecomputedStore

log = logging.getLogger(__name__)

# Scores a batch of named ranker tensors synchronously (OnnxRanker.run): the fast path offline.
BatchScoreFn = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class PrecomputeConfig:
    top_n: int = 50
    """Length of each user's stored list."""
    n_candidates: int = 200
    """Candidates retrieved (after removing seen items) and ranked per user."""
    batch_users: int = 256
    """Users per FAISS search, ranking batch, Redis write and checkpoint."""
    ttl_s: int = 7 * 86400
    """Lifetime of a stored list; the job reruns well within it."""
    shard_index: int = 0
    shard_count: int = 1

    def validate(self) -> None:
        if not 1 <= self.top_n <= self.n_candidates:
            raise ValueError(f"top_n must be in 1..n_candidates ({self.n_candidates}), got {self.top_n}")
        if self.batch_users < 1 or self.ttl_s < 1:
            raise ValueError(f"batch_users and ttl_s must be integers >= 1, got {self.batch_users}, {self.ttl_s}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(
                f"shard_index must be in 0..shard_count-1 ({self.shard_count - 1}), got {self.shard_index}"
            )


class Candidates:
    """Bundle-derived lookups shared by the job and ``offline_top_n``."""

    def __init__(self, bundle: Bundle, retriever: FaissRetriever, cfg: PrecomputeConfig) -> None:
        self.bundle = bundle
        self.retriever = retriever
        self.cfg = cfg
        self.item_row = {item: r for r, item in enumerate(bundle.item_ids)}
        self.seen = [set(bundle.user_history.get(u, ())) for u in bundle.user_ids]
        # One retrieval depth for every user: deep enough to leave n_candidates after the longest
        # history, and the same whether a user is searched alone or in a batch.
        self.k = min(len(bundle.item_ids), cfg.n_candidates + max((len(s) for s in self.seen), default=0))
        self.context = default_context(1)[0]

    def for_users(self, rows: Sequence[int]) -> list[list[str]]:
        ids, _ = self.retriever.search_sync(self.bundle.user_embeddings[list(rows)], self.k)
        return [
            [i for i in found if i not in self.seen[r]][: self.cfg.n_candidates]
            for r, found in zip(rows, ids, strict=True)
        ]

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
    (items,) = candidates.for_users([row])
    request = candidates.request(row, items)
    scores = check_scores(score(request.tensors()), request.n_candidates, "offline")
    return top_n(items, scores, candidates.cfg.top_n)


async def score_requests(ranker: Ranker, requests: list[RankingRequest]) -> list[np.ndarray]:
    """Score many users' candidates. A ranker with a synchronous batched ``run`` (in-process ONNX
    Runtime) gets one call for the whole batch; any other ``Ranker`` (Triton) gets concurrent calls,
    which its server-side dynamic batching merges."""
    run = getattr(ranker, "run", None)
    if run is None:
        return list(await asyncio.gather(*(ranker.score(r) for r in requests)))
    per_request = [r.tensors() for r in requests]
    merged = {name: np.concatenate([t[name] for t in per_request]) for name in per_request[0]}
    flat = check_scores(await asyncio.to_thread(run, merged), len(merged["item_embedding"]), "batch ranker")
    bounds = np.cumsum([0, *(r.n_candidates for r in requests)])
    return [flat[lo:hi] for lo, hi in itertools.pairwise(bounds.tolist())]


@dataclass
class PrecomputeReport:
    version: str
    shard: str
    users: int
    skipped_users: int
    seconds: float

    @property
    def users_per_s(self) -> float:
        done = self.users - self.skipped_users
        return done / self.seconds if self.seconds else 0.0


async def precompute(
    backend: Backend,
    bundle: Bundle,
    retriever: FaissRetriever,
    ranker: Ranker,
    cfg: PrecomputeConfig,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> PrecomputeReport:
    cfg.validate()
    started = time.perf_counter()
    candidates = Candidates(bundle, retriever, cfg)
    store = RedisPrecomputedStore(backend, ranker.model_version)  # the version's own lists, beside the others
    rows = list(range(cfg.shard_index, len(bundle.user_ids), cfg.shard_count))
    shard = f"{cfg.shard_index}of{cfg.shard_count}"
    ckpt = keys.checkpoint(ranker.model_version, f"precompute:{shard}")
    raw = await backend.control(Command("GET", ckpt))
    done = min(int(raw), len(rows)) if raw is not None else 0
    skipped = done
    with tqdm(total=len(rows), initial=done, desc=f"precompute {shard}", unit="user", disable=not progress) as bar:
        while done < len(rows):
            batch = rows[done : done + cfg.batch_users]
            lists = await asyncio.to_thread(candidates.for_users, batch)
            requests = [candidates.request(r, items) for r, items in zip(batch, lists, strict=True)]
            scores = await score_requests(ranker, requests)
            now = time.time()
            recs = {}
            for r, items, s in zip(batch, lists, scores, strict=True):
                best, best_scores = top_n(items, s, cfg.top_n)
                recs[bundle.user_ids[r]] = Recommendations(tuple(best), tuple(best_scores), ranker.model_version, now)
            await store.set_recs(recs, cfg.ttl_s)
            done += len(batch)
            await backend.control(Command("SET", ckpt, (done,)))
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(done)
    return PrecomputeReport(ranker.model_version, shard, len(rows), skipped, time.perf_counter() - started)
