"""The topology seam under every store: run commands grouped per shard/node, one round trip per group,
all groups concurrently, each under a deadline.

The stores (embeddings, features, precomputed) are written once against ``Backend``; ``sharded.py``
(standalone servers + hash ring) and ``cluster.py`` (Redis Cluster) differ only in how they group.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import numpy as np
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from orchestrator.readiness import Readiness
from orchestrator.store import keys
from orchestrator.store.errors import StoreConfigError, StoreUnavailable


@dataclass(frozen=True)
class ConnectionOptions:
    """How every client of one deployment connects: credentials, TLS and a bounded pool.

    Credentials in a URL win over these (redis-py merges URL options last), so a URL that names its own
    user keeps working; the password is kept out of ``repr`` so it never reaches a log line.
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    max_connections: int = 64
    pool_timeout_s: float = 1.0
    connect_timeout_s: float = 0.5
    # How long a command may wait for its reply at all. Callers stop waiting at their own (much shorter)
    # deadline but leave the command to finish (``gather_groups``); this bounds how long it may hold its
    # connection when the server hangs.
    reply_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise StoreConfigError("max_connections", "must be an integer >= 1", self.max_connections)
        if self.pool_timeout_s <= 0:
            raise StoreConfigError("pool_timeout_s", "must be > 0", self.pool_timeout_s)
        if self.reply_timeout_s <= 0:
            raise StoreConfigError("reply_timeout_s", "must be > 0", self.reply_timeout_s)

    def client_kwargs(self, tls: bool) -> dict[str, Any]:
        """Keyword arguments for redis-py clients (and pools) of this deployment."""
        kwargs: dict[str, Any] = {"socket_connect_timeout": self.connect_timeout_s}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if tls and self.ca_file is not None:
            # Only for TLS connections: plain connections reject ssl_* arguments.
            kwargs["ssl_ca_certs"] = str(self.ca_file)
        return kwargs

    def client(self, url: str) -> Redis:
        """A client with a bounded pool: a burst waits up to ``pool_timeout_s`` for a free connection
        instead of opening connections without limit (or failing at once, as the default pool does).
        No client-side retries: the caller's per-shard deadline is the policy, and its fallback is
        faster than a reconnect loop."""
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=self.max_connections,
            timeout=self.pool_timeout_s,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=self.reply_timeout_s,
            **self.client_kwargs(is_tls(url)),
        )
        return Redis.from_pool(pool)


def is_tls(url: str) -> bool:
    return urlsplit(url).scheme == "rediss"


class Command(NamedTuple):
    name: str  # GET, SET, SADD, ...
    key: str
    args: tuple[Any, ...] = ()
    head: tuple[Any, ...] = ()  # arguments before the key: EVAL's script and key count

    def argv(self) -> tuple[Any, ...]:
        """The command as sent: name, head, key, args (routing reads ``key`` alone)."""
        return (self.name, *self.head, self.key, *self.args)


@dataclass(frozen=True)
class Replies:
    """One reply per command, in command order; a command whose group did not answer has None and is
    flagged in ``unavailable``."""

    values: list[Any]
    unavailable: np.ndarray  # bool [len(commands)]
    down: tuple[str, ...]
    # Of ``down``, the groups that missed their deadline (rather than refusing or failing): the caller may
    # have been late itself (orchestrator/recommender.py tells a late event loop from a slow shard).
    timed_out: tuple[str, ...] = ()

    def raise_if_down(self, operation: str) -> None:
        if self.down:
            raise StoreUnavailable(operation, self.down, self.timed_out)


class Backend(Protocol):
    async def execute(self, commands: Sequence[Command]) -> Replies: ...

    async def control(self, command: Command) -> Any:
        """Run on the node that owns control keys (version pointer, checkpoints); raises if down."""
        ...

    async def delete_matching(self, pattern: str, batch: int = 1000) -> int:
        """SCAN (never KEYS) every node for ``pattern`` and UNLINK what matches; for background jobs."""
        ...

    async def ready(self) -> Readiness:
        """Whether the node that owns control keys answers now (for /readyz, within a fraction of a second)."""
        ...

    async def aclose(self) -> None: ...


async def answers_ping(backend: Backend, timeout_s: float = 0.5) -> Readiness:
    """``ready`` of a topology: a PING routed like the version pointer answers within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            await backend.control(Command("PING", keys.ACTIVE_POINTER))
    except (StoreUnavailable, TimeoutError, OSError):
        return Readiness(False, "unreachable")
    return Readiness(True, "ok")


# What "the shard did not answer" looks like; anything else (WRONGTYPE, a bug) propagates.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.SlotNotCoveredError,
    TimeoutError,
    OSError,
)
# Of those, a group that did not answer within its deadline (redis-py's socket timeout, or ours).
TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (redis_errors.TimeoutError, TimeoutError)


async def gather_groups(
    groups: dict[str, list[int]],
    n_commands: int,
    run_group: Callable[[str, list[int]], Awaitable[list[Any]]],
    timeout_s: float,
) -> Replies:
    """Run each group under its own deadline; a group that fails to answer marks its commands
    unavailable.

    At the deadline the caller stops waiting but the group's commands are not cancelled: redis-py drops
    a connection whose command was cancelled, so under a burst (an event loop running late fires many
    deadlines at once, some possibly with their replies already in the socket) every missed deadline would cost a
    reconnect, and the reconnects would make the loop later still: the service would not come back
    from the burst (seen in the load test). Left to finish, the reply is read and the connection goes
    back to the pool. The pool size and ``ConnectionOptions.reply_timeout_s`` bound what is left running.
    """

    async def guarded(name: str, indices: list[int]) -> list[Any] | _Down:
        call = asyncio.ensure_future(run_group(name, indices))
        call.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except UNAVAILABLE_ERRORS as exc:
            return _Down(exc)

    names = list(groups)
    if len(names) == 1:
        # The common case (one shard, or keys sharing a hash tag): no gather, and no task wrapping it, for one group.
        outcomes: list[list[Any] | _Down | BaseException] = [await guarded(names[0], groups[names[0]])]
    else:
        # return_exceptions: a bug in one group must not leave the others running unobserved.
        outcomes = await asyncio.gather(*(guarded(name, groups[name]) for name in names), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    values: list[Any] = [None] * n_commands
    unavailable = np.zeros(n_commands, dtype=bool)
    down: list[str] = []
    timed_out: list[str] = []
    for name, outcome in zip(names, outcomes, strict=True):
        indices = groups[name]
        if isinstance(outcome, _Down):
            unavailable[indices] = True
            down.append(name)
            if isinstance(outcome.error, TIMEOUT_ERRORS):
                timed_out.append(name)
            continue
        assert not isinstance(outcome, BaseException)
        if len(outcome) != len(indices):
            raise RuntimeError(f"{name} returned {len(outcome)} replies for {len(indices)} commands")
        for i, value in zip(indices, outcome, strict=True):
            values[i] = value
    return Replies(values, unavailable, tuple(down), tuple(timed_out))


def _retrieve(call: asyncio.Future[Any]) -> None:
    """Marks the outcome of a call nobody may be waiting for any more as seen (no "never retrieved")."""
    if not call.cancelled():
        call.exception()


@dataclass(frozen=True)
class _Down:
    error: BaseException
