"""The traffic model of the load test, apart from locust so that it can be unit-tested and reused.

Who asks: users drawn with the skew of the data. On the synthetic set, Zipf over users ranked by activity
(the generator draws item popularity from a Zipf law, so activity is heavy-tailed too); on MovieLens the
empirical activity itself (a user's weight is the length of their history). Where: page type and device
drawn from fixed shares that look like a shop (home and product pages, mostly web and phones).
What: personalised lists, anonymous segment lists, and events, some of them purchases (which invalidate
the user's cached lists).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.history import read_arrays

PAGE_TYPES: tuple[tuple[str, float], ...] = (
    ("home", 0.40),
    ("product", 0.30),
    ("category", 0.15),
    ("search", 0.10),
    ("cart", 0.05),
)
DEVICES: tuple[tuple[str, float], ...] = (("web", 0.45), ("ios", 0.25), ("android", 0.25), ("tv", 0.05))
EVENT_TYPES: tuple[tuple[str, float], ...] = (
    ("view", 0.60),
    ("click", 0.25),
    ("add_to_cart", 0.10),
    ("purchase", 0.05),
)
# Shares of the request mix: personalised lists dominate; anonymous visitors and events make up the rest.
MIX_RECOMMENDATIONS = 80
MIX_SEGMENTS = 10
MIX_EVENTS = 10


class Weighted:
    """A fixed discrete distribution, sampled with one bisect per draw (cheap enough for locust)."""

    def __init__(self, values: Sequence[str], weights: Sequence[float]) -> None:
        if len(values) != len(weights) or not values:
            raise ValueError(f"expected one weight per value, got {len(values)} values and {len(weights)} weights")
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        total = float(sum(weights))
        self.values = list(values)
        self.cum_weights = list(itertools.accumulate(w / total for w in weights))

    def draw(self, rng: random.Random) -> str:
        return rng.choices(self.values, cum_weights=self.cum_weights)[0]

    def share(self, top: int) -> float:
        """Probability mass of the ``top`` first values (the most active users when built by activity)."""
        return self.cum_weights[min(top, len(self.values)) - 1]


def zipf_weights(n: int, exponent: float) -> list[float]:
    return [1.0 / rank**exponent for rank in range(1, n + 1)]


@dataclass(frozen=True)
class Traffic:
    dataset: str
    users: Weighted
    items: list[str]
    segments: list[str]
    user_skew: str  # how users were weighted, for the report

    @classmethod
    def from_bundle(cls, bundle: Path, zipf_exponent: float = 1.0) -> Traffic:
        """Weights from the bundle's history lengths: Zipf by activity rank (synthetic) or the empirical
        activity (MovieLens, or any other real data set)."""
        manifest = json.loads((bundle / "manifest.json").read_text())
        indptr, _ = read_arrays(bundle)
        users: list[str] = json.loads((bundle / "users.json").read_text())
        history = {user: int(n) for user, n in zip(users, np.diff(indptr).tolist(), strict=True) if n}
        items: list[str] = json.loads((bundle / "items.json").read_text())
        segments = sorted(json.loads((bundle / "popular.json").read_text()))
        dataset = str(manifest.get("dataset", "synthetic"))
        by_activity = sorted(history, key=lambda user: (-history[user], user))
        if dataset.startswith("synthetic"):  # the generated sets: synthetic, synthetic-1m
            weights = zipf_weights(len(by_activity), zipf_exponent)
            skew = f"Zipf (s={zipf_exponent:g}) over {len(by_activity)} users ranked by history length"
        else:
            weights = [float(history[user]) for user in by_activity]
            skew = f"empirical activity (history length) of {len(by_activity)} {dataset} users"
        return cls(dataset, Weighted(by_activity, weights), items, segments, skew)


PAGE_TYPE_DIST = Weighted([p for p, _ in PAGE_TYPES], [w for _, w in PAGE_TYPES])
DEVICE_DIST = Weighted([d for d, _ in DEVICES], [w for _, w in DEVICES])
EVENT_DIST = Weighted([e for e, _ in EVENT_TYPES], [w for _, w in EVENT_TYPES])


def source_of(body: bytes) -> str:
    """The ``source`` field of a recommendations answer without a JSON parse (locust's CPU is the
    bottleneck on a small machine); the service writes compact JSON (orjson)."""
    start = body.find(b'"source":"')
    if start < 0:
        return "unknown"
    start += len(b'"source":"')
    end = body.find(b'"', start)
    return body[start:end].decode() if end > start else "unknown"


def most_asked(users: Weighted, count: int) -> list[tuple[str, str, str]]:
    """The ``count`` (user, page type, device) combinations most likely to be asked, most likely first: the
    user's share times the page type's times the device's (what a warm cache holds)."""
    shares = [b - a for a, b in zip([0.0, *users.cum_weights], users.cum_weights, strict=False)]
    combos = [
        (share * p_share * d_share, user, page_type, device)
        for user, share in zip(users.values, shares, strict=True)
        for page_type, p_share in PAGE_TYPES
        for device, d_share in DEVICES
    ]
    combos.sort(key=lambda c: -c[0])
    return [(user, page_type, device) for _, user, page_type, device in combos[:count]]


def draw_context(rng: random.Random) -> tuple[str, str]:
    """A page type and a device for one request, each from its own share (every personalised request draws
    its own: a user sees many contexts, and each is its own cached list)."""
    return PAGE_TYPE_DIST.draw(rng), DEVICE_DIST.draw(rng)


class NeverAsked:
    """(user, page type, device) combinations, none drawn twice until ``reset``: every request a cache miss.

    The user is drawn from ``users`` (Zipf over users, as everywhere else) and the context from the page type
    and device shares; a combination already drawn is replaced by one of that user's contexts not yet drawn,
    and a user with none left by a user who still has some (so the hottest users run out first and the draw
    flattens as a run goes on). ``draw`` returns None when every combination was drawn. The pool is
    users x page types x devices (20 contexts a user): a load step that would ask more than that must reset
    it and empty the service's cache together (loadtest/cachectl.py), which the load shape does per step.
    """

    def __init__(self, users: Weighted, rng: random.Random, zipf_tries: int = 8) -> None:
        self.users = users
        self.rng = rng
        self.zipf_tries = zipf_tries
        self.contexts = [(p, d) for p, _ in PAGE_TYPES for d, _ in DEVICES]
        self.reset()

    def reset(self) -> None:
        self.asked: dict[str, set[tuple[str, str]]] = {}
        self.open_users = list(self.users.values)  # users with a context not yet drawn
        self.open_index = {user: i for i, user in enumerate(self.open_users)}
        self.drawn = 0

    @property
    def size(self) -> int:
        return len(self.users.values) * len(self.contexts)

    def draw(self) -> tuple[str, str, str] | None:
        if not self.open_users:
            return None
        user = next(
            (u for u in (self.users.draw(self.rng) for _ in range(self.zipf_tries)) if u in self.open_index),
            None,
        ) or self.rng.choice(self.open_users)
        asked = self.asked.setdefault(user, set())
        context = draw_context(self.rng)
        if context in asked:
            context = self.rng.choice([c for c in self.contexts if c not in asked])
        asked.add(context)
        self.drawn += 1
        if len(asked) == len(self.contexts):
            self._close(user)
        return user, *context

    def _close(self, user: str) -> None:
        # Swap-remove: O(1), and the list stays the users one can still draw.
        index = self.open_index.pop(user)
        last = self.open_users.pop()
        if last != user:
            self.open_users[index] = last
            self.open_index[last] = index
