"""The ranking seam: one small Protocol, one module per backend beside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from orchestrator import schema
from orchestrator.readiness import Readiness


@dataclass(frozen=True)
class RankingRequest:
    """One user's candidates. ``item_*`` have one row per candidate; the rest are per user."""

    user_embedding: np.ndarray  # float32 [dim]
    user_features: np.ndarray  # int64 [len(USER_FEATURES)]
    item_embeddings: np.ndarray  # float32 [n, dim]
    item_features: np.ndarray  # int64 [n, len(ITEM_FEATURES)]
    context_features: np.ndarray  # int64 [len(CONTEXT_FEATURES)]

    @property
    def n_candidates(self) -> int:
        return int(self.item_embeddings.shape[0])

    def tensors(self) -> dict[str, np.ndarray]:
        """The ranker's named input tensors, one row per candidate (user and context broadcast)."""
        n = self.n_candidates
        if self.item_features.shape[0] != n:
            raise ValueError(f"item_features has {self.item_features.shape[0]} rows but item_embeddings has {n}")
        return {
            "user_embedding": np.ascontiguousarray(
                np.broadcast_to(self.user_embedding.astype(np.float32), (n, self.user_embedding.shape[-1]))
            ),
            "item_embedding": np.ascontiguousarray(self.item_embeddings, dtype=np.float32),
            "user_features": np.ascontiguousarray(
                np.broadcast_to(self.user_features.astype(np.int64), (n, len(schema.USER_FEATURES)))
            ),
            "item_features": np.ascontiguousarray(self.item_features, dtype=np.int64),
            "context_features": np.ascontiguousarray(
                np.broadcast_to(self.context_features.astype(np.int64), (n, len(schema.CONTEXT_FEATURES)))
            ),
        }


class Ranker(Protocol):
    """Scores candidates for one user; returns float32 [n_candidates], one score per candidate.

    ``timeout_s`` is what is left of the caller's deadline, and goes with the call to the ranker; past it the
    call raises TimeoutError (the budget ran out: fallback reason ``deadline``), where a ranker that cannot
    answer raises RankerUnavailable.
    ``ready`` says whether it can score now (for /readyz, within a fraction of a second); ``aclose`` lets
    calls in flight finish and releases what it holds.
    """

    model_version: str

    async def score(self, request: RankingRequest, timeout_s: float | None = None) -> np.ndarray: ...

    async def ready(self) -> Readiness: ...

    async def aclose(self) -> None: ...


class RankerUnavailable(Exception):
    """The ranker could not answer (down, timed out, overloaded): the caller falls back."""


def check_scores(scores: np.ndarray, expected: int, backend: str) -> np.ndarray:
    """Enforce the contract: exactly one finite score per candidate."""
    flat = np.asarray(scores, dtype=np.float32).reshape(-1)
    if flat.shape[0] != expected:
        raise RankerUnavailable(f"{backend} returned {flat.shape[0]} scores for {expected} candidates")
    return flat
