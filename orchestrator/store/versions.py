"""Model versions in Redis: metadata per version, one pointer key to the active one.

Load v2 beside v1 (its keys carry ``m:v2:``), ``switch`` flips ``dp:active`` with one GETSET (atomic, so a
reader sees v1 or v2, never a mix), remembers v1 in ``dp:previous`` (what ``rollback`` returns to) and
publishes the new version on ``recserve:version``, so replicas follow at once (they also poll the pointer).
Replicas ``register`` the versions they hold with a TTL; ``drop`` of a version that one still holds is
refused (``in_use``), so nothing is deleted under a replica.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from orchestrator.store import keys
from orchestrator.store.backend import Backend, Command
from orchestrator.store.codec import EmbeddingCodec
from orchestrator.store.errors import VersionError


@dataclass(frozen=True)
class VersionInfo:
    version: str
    dim: int
    dtype: str = "fp32"
    triton_version: int | None = None
    """The version's number in the Triton repository and its bundle folder (``v<N>``); None: unknown."""

    def __post_init__(self) -> None:
        keys.check_version(self.version)
        EmbeddingCodec(self.dim, self.dtype)  # validates dim and dtype

    @property
    def codec(self) -> EmbeddingCodec:
        return EmbeddingCodec(self.dim, self.dtype)


async def write_meta(backend: Backend, info: VersionInfo) -> None:
    await backend.control(Command("SET", keys.version_meta(info.version), (json.dumps(asdict(info)),)))


async def read_meta(backend: Backend, version: str) -> VersionInfo:
    raw = await backend.control(Command("GET", keys.version_meta(version)))
    if raw is None:
        raise VersionError(f"metadata for version {version!r} at {keys.version_meta(version)!r}", "none")
    try:
        return VersionInfo(**json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise VersionError(f"version metadata JSON {{version, dim, dtype}} for {version!r}", repr(raw)) from exc


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def active_name(backend: Backend) -> str | None:
    """The active version's name, or None before the first switch: one GET (the replicas' poll)."""
    raw = await backend.control(Command("GET", keys.ACTIVE_POINTER))
    return None if raw is None else _text(raw)


async def previous_name(backend: Backend) -> str | None:
    raw = await backend.control(Command("GET", keys.PREVIOUS_POINTER))
    return None if raw is None else _text(raw)


async def active(backend: Backend) -> VersionInfo:
    """The version readers should use (read once at start-up and on each poll, never per request)."""
    raw = await backend.control(Command("GET", keys.ACTIVE_POINTER))
    if raw is None:
        raise VersionError(f"an active version at {keys.ACTIVE_POINTER!r}", "no pointer")
    return await read_meta(backend, raw.decode() if isinstance(raw, bytes) else str(raw))


async def switch(backend: Backend, version: str) -> str | None:
    """Point readers at ``version``; returns the version it replaced (None on first load)."""
    await read_meta(backend, version)  # never point at a version that was not loaded
    # GETSET: one atomic swap that also says what it replaced (redis-py parses SET ... GET as a bool).
    raw = await backend.control(Command("GETSET", keys.ACTIVE_POINTER, (version,)))
    previous = None if raw is None else _text(raw)
    await backend.control(Command("DEL", keys.CANARY_POINTER))  # a switch ends any canary (promoted or not)
    if previous is not None and previous != version:
        await backend.control(Command("SET", keys.PREVIOUS_POINTER, (previous,)))
    # Replicas also poll the pointer: a notice lost with a connection delays a switch by one poll, no more.
    await backend.control(Command("PUBLISH", keys.VERSION_CHANNEL, (version,)))
    return previous


async def canary(backend: Backend) -> tuple[str, int] | None:
    """(version, percent of users) of the canary, or None."""
    raw = await backend.control(Command("GET", keys.CANARY_POINTER))
    if raw is None:
        return None
    name, _, percent = _text(raw).partition(" ")
    return name, int(percent or 0)


async def set_canary(backend: Backend, version: str, percent: int) -> None:
    """Send ``percent`` % of users (a stable hash of the user id) to ``version``; the rest stay on the active."""
    if not 0 < percent <= 100:
        raise VersionError("a canary share in 1..100 percent", str(percent), "pass --canary PCT with 1 <= PCT <= 100")
    await read_meta(backend, version)
    await backend.control(Command("SET", keys.CANARY_POINTER, (f"{version} {percent}",)))
    await backend.control(Command("PUBLISH", keys.VERSION_CHANNEL, (version,)))


async def clear_canary(backend: Backend) -> str | None:
    """End the canary (every user back on the active version); returns the canary's version, if there was one."""
    current = await canary(backend)
    await backend.control(Command("DEL", keys.CANARY_POINTER))
    await backend.control(Command("PUBLISH", keys.VERSION_CHANNEL, ("",)))
    return None if current is None else current[0]


async def rollback(backend: Backend) -> tuple[str, str]:
    """End a canary if there is one (every user back on the active version); else switch back to the version
    the last switch replaced. Returns (from, to)."""
    active_version = await active_name(backend)
    ended = await clear_canary(backend)
    if ended is not None and active_version is not None:
        return ended, active_version
    target = await previous_name(backend)
    if target is None:
        raise VersionError(f"a previous version at {keys.PREVIOUS_POINTER!r} to roll back to", "none")
    replaced = await switch(backend, target)
    return replaced or "none", target


async def register(backend: Backend, replica: str, held: list[str], ttl_s: float, now: float | None = None) -> None:
    """A replica says which versions it holds (the active one, and one still loading or draining); the claim
    lapses ``ttl_s`` after the last call, so a replica that died stops protecting its versions."""
    expires = (time.time() if now is None else now) + ttl_s
    args: list[object] = []
    for version in held:
        args += [expires, f"{replica} {keys.check_version(version)}"]
    if args:
        await backend.control(Command("ZADD", keys.REPLICAS, tuple(args)))


async def unregister(backend: Backend, replica: str, held: list[str]) -> None:
    members = tuple(f"{replica} {v}" for v in held)
    if members:
        await backend.control(Command("ZREM", keys.REPLICAS, members))


async def in_use(backend: Backend, now: float | None = None) -> dict[str, list[str]]:
    """Version -> replicas whose claim on it has not lapsed (lapsed claims are removed)."""
    now = time.time() if now is None else now
    await backend.control(Command("ZREMRANGEBYSCORE", keys.REPLICAS, ("-inf", f"({now}")))
    members = await backend.control(Command("ZRANGE", keys.REPLICAS, (0, -1)))
    held: dict[str, list[str]] = {}
    for member in members or []:
        replica, _, version = _text(member).rpartition(" ")
        held.setdefault(version, []).append(replica)
    return held


async def drop(backend: Backend, version: str, batch: int = 1000) -> int:
    """Delete every key of an inactive version; returns how many. Off the request path only."""
    if await active_name(backend) == version:
        raise VersionError(f"an inactive version to drop (switch away from {version!r} first)", "the active one")
    return await backend.delete_matching(keys.version_pattern(version), batch)


async def retire(backend: Backend, version: str, batch: int = 1000, drop_rollback_target: bool = False) -> int:
    """``drop``, but only when no replica still holds ``version`` (``register``) and, unless
    ``drop_rollback_target``, when it is not what ``rollback`` would return to; returns the keys deleted."""
    if await active_name(backend) == version:
        raise VersionError(
            f"an inactive version to retire ({version!r})", "the active one", "publish or roll back to another first"
        )
    if (current := await canary(backend)) is not None and current[0] == version:
        raise VersionError(f"a version other than the canary to retire ({version!r})", "the canary", "roll back first")
    if not drop_rollback_target and await previous_name(backend) == version:
        raise VersionError(
            f"a version other than the rollback target to retire ({version!r} is what a rollback returns to)",
            "the previous one",
            "publish another version first, or pass --drop-rollback-target",
        )
    holders = (await in_use(backend)).get(version, [])
    if holders:
        raise VersionError(
            f"no replica holding version {version!r} before it is retired",
            f"held by {', '.join(sorted(holders))}",
            "retire it once they have switched away (their claims lapse within versions.claim_ttl_s)",
        )
    dropped = await drop(backend, version, batch)
    if await previous_name(backend) == version:
        await backend.control(Command("DEL", keys.PREVIOUS_POINTER))  # nothing left to roll back to
    return dropped
