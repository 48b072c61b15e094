"""Model versions in Redis: metadata per version, one pointer key to the active one.

Load v2 beside v1 (its keys carry ``m:v2:``), ``switch`` flips ``dp:active`` with one SET (atomic, so a
reader sees v1 or v2, never a mix), then ``drop`` v1 from a background job with SCAN + UNLINK.
"""

from __future__ import annotations

import json
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
    previous = await backend.control(Command("GETSET", keys.ACTIVE_POINTER, (version,)))
    if previous is None:
        return None
    return previous.decode() if isinstance(previous, bytes) else str(previous)


async def drop(backend: Backend, version: str, batch: int = 1000) -> int:
    """Delete every key of an inactive version; returns how many. Off the request path only."""
    current = await backend.control(Command("GET", keys.ACTIVE_POINTER))
    if current is not None and (current.decode() if isinstance(current, bytes) else current) == version:
        raise VersionError(f"an inactive version to drop (switch away from {version!r} first)", "the active one")
    return await backend.delete_matching(keys.version_pattern(version), batch)
