"""Model versions side by side in one replica: the immutable ``ModelVersion`` a request serves from, and the
``VersionWatcher`` that follows the active-version pointer in Redis (docs/RELEASES.md).

A request takes one reference to the current ``ModelVersion`` at its start and uses only its parts (index,
ranker, store views, version id), so it never mixes versions however the pointer moves meanwhile. The watcher
learns of a switch from the notice on ``recserve:version`` (at once) or from its poll of ``dp:active`` (every
``versions.poll_s``, in case a notice was lost), builds the new version beside the old one (the index and
the ranker load off the event loop, then one warm-up pass), swaps the reference (one assignment: atomic on
the event loop) and closes the old parts once the requests that took them have had time to finish. It
registers the versions it holds in Redis with a TTL, renewed every poll, so that ``python -m export retire``
never deletes a version under a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from orchestrator import metrics
from orchestrator.cache import raise_if_cancelling
from orchestrator.ranking import Ranker, RankerUnavailable
from orchestrator.readiness import Readiness
from orchestrator.retrieval import Retriever
from orchestrator.store import EmbeddingStore, FeatureStore, PrecomputedStore, keys, versions
from orchestrator.store.backend import Backend
from orchestrator.store.errors import StoreError
from orchestrator.store.versions import VersionInfo

log = logging.getLogger(__name__)

VERSION_PLACEHOLDER = "{version}"


@dataclass(frozen=True)
class ModelVersion:
    """Everything a request needs that depends on the model version; never changed once built."""

    version: str
    retriever: Retriever
    ranker: Ranker
    embeddings: EmbeddingStore
    features: FeatureStore
    precomputed: PrecomputedStore | None  # None: the fallback chain's own store
    n_items: int
    catalogue: frozenset[str] = field(default_factory=frozenset)
    triton_version: int | None = None
    dim: int = 0  # embedding width (the index's)

    async def aclose(self) -> None:
        for part in (self.ranker, self.retriever):
            with contextlib.suppress(Exception):
                await part.aclose()


def version_path(path: Path, triton_version: int | None) -> Path:
    """``path`` with ``{version}`` replaced by the version's number; a path without it is every version's."""
    text = str(path)
    if VERSION_PLACEHOLDER not in text:
        return path
    if triton_version is None:
        raise FileNotFoundError(f"{text} names a version number, but the version's metadata has none")
    return Path(text.replace(VERSION_PLACEHOLDER, str(triton_version)))


def replica_name() -> str:
    """This process, as the versions it holds are registered under (host and pid, plus a random tail)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class VersionHolder(Protocol):
    """Where the current ``ModelVersion`` lives (the recommender)."""

    @property
    def current(self) -> ModelVersion: ...

    def swap(self, new: ModelVersion) -> ModelVersion:
        """Serve ``new`` from the next request on; returns the version it replaced."""
        ...

    @property
    def canary(self) -> tuple[ModelVersion, int] | None: ...

    def set_canary(self, canary: tuple[ModelVersion, int] | None) -> tuple[ModelVersion, int] | None:
        """Serve that share of users (percent) from a canary version, or nobody (None); returns the old one."""
        ...


# The failures that leave a replica on its old version until the next poll (logged, never raised).
BUILD_ERRORS = (OSError, ValueError, RuntimeError, StoreError, RankerUnavailable, TimeoutError)
WATCH_ERRORS = (StoreError, redis_errors.RedisError, OSError, TimeoutError)


class VersionWatcher:
    def __init__(
        self,
        backend: Backend,
        pubsub: Redis,
        holder: VersionHolder,
        build: Callable[[VersionInfo], Awaitable[ModelVersion]],
        on_swap: Callable[[ModelVersion], None] = lambda _: None,
        poll_s: float = 2.0,
        claim_ttl_s: float = 15.0,
        drain_s: float = 10.0,
        behind_max_s: float = 30.0,
        replica: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.pubsub = pubsub
        self.holder = holder
        self.build = build
        self.on_swap = on_swap
        self.poll_s = poll_s
        self.claim_ttl_s = claim_ttl_s
        self.drain_s = drain_s
        self.behind_max_s = behind_max_s
        self.replica = replica or replica_name()
        self.clock = clock
        self.pointer: str | None = None  # the active version as last read
        self.behind_since = math.inf  # when the pointer was first seen to name another version than served
        self.last_error: str | None = None
        self._loading: str | None = None
        self._draining: dict[str, ModelVersion] = {}
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._claimed: set[str] = set()  # every version this replica has registered (all given up at close)
        self.subscribed = asyncio.Event()

    def held(self) -> list[str]:
        canary = self.holder.canary
        extra = [v for v in (self._loading, canary[0].version if canary else None) if v]
        return sorted({self.holder.current.version, *self._draining, *extra})

    def readiness(self) -> Readiness:
        served = self.holder.current.version
        canary = self.holder.canary
        if canary is not None:
            served += f"; canary {canary[0].version} {canary[1]}%"
        if self.pointer is None or self.pointer == self.holder.current.version:
            return Readiness(True, f"ok ({served})")
        if self.clock() - self.behind_since > self.behind_max_s:
            return Readiness(False, f"behind (serving {served}, active {self.pointer}: {self.last_error})")
        return Readiness(True, f"ok ({served}; loading {self.pointer})")

    async def run(self) -> None:
        await asyncio.gather(self._poll_forever(), self._listen_forever())

    async def check(self) -> bool:
        """Follow the pointer (and the canary) if they moved; True when this call swapped the active version."""
        async with self._lock:
            name = await versions.active_name(self.backend)
            canary = await versions.canary(self.backend)
            swapped = await self._follow_active(name)
            await self._follow_canary(canary)
            return swapped

    async def _load(self, name: str) -> ModelVersion | None:
        """``name`` built beside what is served (claimed first), or None when it cannot be yet (logged)."""
        self._loading = name
        try:
            await self.register()
            info = await versions.read_meta(self.backend, name)
            started = time.perf_counter()
            new = await self.build(info)
        except BUILD_ERRORS as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("cannot load model version %s yet (%s)", name, self.last_error)
            return None
        finally:
            self._loading = None
        log.info("model version %s built in %.2f s", name, time.perf_counter() - started)
        return new

    async def _follow_active(self, name: str | None) -> bool:
        self.pointer = name
        served = self.holder.current.version
        if name is None or name == served:
            self.behind_since = math.inf
            return False
        if self.behind_since == math.inf:
            self.behind_since = self.clock()
        canary = self.holder.canary
        # A canary promoted to active is already built.
        new = canary[0] if canary is not None and canary[0].version == name else await self._load(name)
        if new is None:
            return False
        old = self.holder.swap(new)
        self.on_swap(new)
        self.behind_since = math.inf
        self.last_error = None
        metrics.VERSION_SWITCHES.inc()
        log.info("now serving model version %s (was %s)", new.version, old.version)
        self._retire_later(old)
        return True

    async def _follow_canary(self, canary: tuple[str, int] | None) -> None:
        held = self.holder.canary
        if canary is None:
            if held is not None:
                self.holder.set_canary(None)
                log.info("canary %s ended", held[0].version)
                self._retire_later(held[0])
            return
        name, percent = canary
        if held is not None and held[0].version == name:
            if held[1] != percent:
                self.holder.set_canary((held[0], percent))
            return
        built = self.holder.current if name == self.holder.current.version else await self._load(name)
        if built is None:
            return
        replaced = self.holder.set_canary((built, percent))
        log.info("canary: %d%% of users served by model version %s", percent, name)
        if replaced is not None:
            self._retire_later(replaced[0])

    def _retire_later(self, old: ModelVersion) -> None:
        canary = self.holder.canary
        if old is self.holder.current or (canary is not None and canary[0] is old):
            return  # still served (a canary promoted, or a canary of the active version)
        self._draining[old.version] = old

        async def close() -> None:
            await asyncio.sleep(self.drain_s)
            self._draining.pop(old.version, None)
            await old.aclose()
            if old.version not in self.held():
                with contextlib.suppress(*WATCH_ERRORS):  # else it lapses within claim_ttl_s
                    await versions.unregister(self.backend, self.replica, [old.version])

        task = asyncio.ensure_future(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def register(self) -> None:
        held = self.held()
        self._claimed.update(held)
        await versions.register(self.backend, self.replica, held, self.claim_ttl_s)

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.check()
                await self.register()
            except WATCH_ERRORS as exc:
                log.warning("model version poll failed (%s: %s)", type(exc).__name__, exc)
            await asyncio.sleep(self.poll_s)

    async def _listen_forever(self) -> None:
        backoff_s = 0.1
        while True:
            channel = self.pubsub.pubsub(ignore_subscribe_messages=True)
            try:
                await channel.subscribe(keys.VERSION_CHANNEL)
                self.subscribed.set()
                backoff_s = 0.1
                while True:
                    raise_if_cancelling()  # redis-py can turn a cancel during its read into an empty read
                    message = await channel.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        try:
                            await self.check()
                        except WATCH_ERRORS as exc:
                            log.warning("model version check failed (%s: %s)", type(exc).__name__, exc)
            except asyncio.CancelledError:
                raise
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("version channel lost (%s); the poll still follows the pointer", exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
            finally:
                with contextlib.suppress(redis_errors.RedisError, OSError):
                    await channel.aclose()

    async def aclose(self) -> None:
        """Close the versions still draining and give up this replica's claims."""
        for task in list(self._closing):
            task.cancel()
        for old in list(self._draining.values()):
            await old.aclose()
        with contextlib.suppress(*WATCH_ERRORS):
            await versions.unregister(self.backend, self.replica, sorted(self._claimed | set(self.held())))
