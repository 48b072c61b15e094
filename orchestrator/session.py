"""The session-aware query: the user's vector moved toward what they touched in this session.

The two towers put users and items in one space and score by dot product, so the weighted mean of the
vectors of the items a user just viewed, clicked or put in the cart points toward that kind of item.
Blending it into the user's vector before retrieval brings similar items (not only the touched ones)
into the candidates, with no retraining: the reference design's hybrid of the offline model and the
live session. The offline evaluation (export/) and the request path use these same functions, so the
gain measured offline is the one served.

Weights: a stronger signal counts more (add to cart over click over view), and an event counts less the
older it is (half-life), nothing past the session window. The session mean is scaled to the user
vector's norm before blending: dot-product retrieval is sensitive to norm, and the two kinds of vector
have different ones, so without it ``alpha`` would not mean the share it says.

After ranking, ``interleave`` gives the session its share of the list's places as well: a ranker that
scores mostly by item (popularity, features) would otherwise rank the session's candidates out of sight
again, and the ranker takes no session features (docs/SESSION.md says why).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T", bound=Hashable)

# How much one event of each kind says about what the user wants now. Purchases are left out: a bought
# item is excluded from answers, and buying one seldom means "more of the same right now".
EVENT_WEIGHTS: Mapping[str, float] = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0}


def event_weights(
    events: Sequence[tuple[str, int]],
    now_ms: int,
    window_s: float,
    half_life_s: float,
    kinds: Mapping[str, float] = EVENT_WEIGHTS,
) -> np.ndarray:
    """One weight per ``(event_type, ts_ms)``: the kind's weight halved every ``half_life_s``, 0 for an
    event of a kind not in ``kinds`` or older than ``window_s`` (or from the future by more than a minute)."""
    if window_s <= 0 or half_life_s <= 0:
        raise ValueError(f"window_s and half_life_s must be > 0, got {window_s} and {half_life_s}")
    weights = np.zeros(len(events), dtype=np.float64)
    for i, (kind, ts_ms) in enumerate(events):
        age_s = (now_ms - ts_ms) / 1000
        if kind not in kinds or age_s > window_s or age_s < -60:
            continue
        weights[i] = kinds[kind] * 0.5 ** (max(age_s, 0.0) / half_life_s)
    return weights


def session_vector(item_vectors: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """The weighted mean of the session's item vectors ``[k, d]``; None when no weight is left."""
    if len(weights) != len(item_vectors):
        raise ValueError(
            f"expected one weight per item vector, but found {len(weights)} weights for {len(item_vectors)} vectors"
        )
    total = float(weights.sum())
    if len(item_vectors) == 0 or total <= 0:
        return None
    return (weights[:, None] * item_vectors.astype(np.float64)).sum(axis=0) / total


def blend_query(user_vector: np.ndarray | None, session: np.ndarray | None, alpha: float) -> np.ndarray | None:
    """``(1 - alpha) * user + alpha * session`` with the session scaled to the user's norm (float32).

    No session: the user's vector unchanged. No user vector (a user the model has not seen): the session
    alone. Neither: None (nothing to retrieve with)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if session is None:
        return None if user_vector is None else user_vector.astype(np.float32)
    if user_vector is None:
        return session.astype(np.float32)
    user = user_vector.astype(np.float64)
    user_norm = float(np.linalg.norm(user))
    session_norm = float(np.linalg.norm(session))
    if session_norm == 0.0:
        return user_vector.astype(np.float32)
    scaled = session * (user_norm / session_norm) if user_norm > 0 else session
    return ((1.0 - alpha) * user + alpha * scaled).astype(np.float32)


def interleave(ranked: Sequence[T], nearest: Sequence[T], share: float, length: int) -> list[T]:
    """``length`` items: ``share`` of the places, spread evenly from the top, taken in order from ``nearest``
    (the candidates nearest the session), the others from ``ranked`` (the ranker's order); an item already
    placed is skipped, and when one source runs out the other fills the rest. ``share`` 0: ``ranked``."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    placed: list[T] = []
    taken: set[T] = set()
    sources = (iter(ranked), iter(nearest))
    for position in range(length):
        # The session's places so far: floor((position + 1) * share), so they are spread evenly.
        session_place = math.floor((position + 1) * share + 1e-9) > math.floor(position * share + 1e-9)
        for source in (sources[session_place], sources[not session_place]):
            item = next((i for i in source if i not in taken), None)
            if item is not None:
                placed.append(item)
                taken.add(item)
                break
        else:
            break  # both sources ran out
    return placed
