"""Bulk loader: an artifact bundle into the data plane (``python -m export load``).

Every write is a SET/SADD of a value that depends only on the bundle, so repeating any part is harmless;
a checkpoint per (version, table) records how many rows are done, so a rerun after a crash skips them.
The new version loads beside the active one; switching is one pointer SET at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from export.artifacts import Bundle
from orchestrator import schema
from orchestrator.store import Recommendations, keys, versions
from orchestrator.store.backend import Backend, Command
from orchestrator.store.embeddings import RedisEmbeddingStore
from orchestrator.store.errors import VersionError
from orchestrator.store.features import RedisFeatureStore
from orchestrator.store.precomputed import RedisPrecomputedStore
from orchestrator.store.versions import VersionInfo

log = logging.getLogger(__name__)

# Called after each chunk is written and checkpointed: (table, rows done). Tests inject crashes here.
ChunkHook = Callable[[str, int], None]
# Writes rows [lo, hi) of one table.
Writer = Callable[[int, int], Awaitable[None]]


@dataclass(frozen=True)
class LoadConfig:
    dtype: str = "fp32"
    """Storage dtype of embeddings: fp32, or fp16 (half the memory; see docs/DATA_PLANE.md)."""
    chunk_rows: int = 5000
    """Rows per pipelined write and per checkpoint."""
    activate: bool = True
    """Switch the version pointer to the loaded version when done."""
    drop_previous: bool = False
    """After switching, delete the version it replaced (SCAN + UNLINK, from this job). Off by default: the
    previous version stays for a rollback until ``python -m export retire`` drops it."""
    seen_ttl_s: int = 30 * 86_400
    """Expiry of the seen sets it writes, renewed by every load and by every purchase event: a user who
    leaves the data leaves nothing behind (the Kubernetes Redis evicts only keys with a TTL). The service's
    ``events.user_state_ttl_s`` default, so a loaded set and one an event extends expire alike."""
    progress: bool = True

    def validate(self) -> None:
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be an integer >= 1, got {self.chunk_rows}")
        if self.seen_ttl_s < 1:
            raise ValueError(f"seen_ttl_s must be an integer >= 1, got {self.seen_ttl_s}")


@dataclass
class LoadReport:
    version: str
    rows: dict[str, int] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    previous: str | None = None
    dropped_keys: int = 0

    @property
    def embeddings_per_s(self) -> float:
        written = sum(self.rows.get(t, 0) - self.skipped_rows.get(t, 0) for t in ("user_embeddings", "item_embeddings"))
        return written / self.seconds if self.seconds else 0.0


class Loader:
    def __init__(self, backend: Backend, bundle: Bundle, cfg: LoadConfig, on_chunk: ChunkHook | None = None) -> None:
        cfg.validate()
        self.backend = backend
        self.bundle = bundle
        self.cfg = cfg
        triton_version = bundle.manifest.get("triton_version")
        self.info = VersionInfo(
            bundle.model_version, bundle.dim, cfg.dtype, None if triton_version is None else int(triton_version)
        )
        self.on_chunk = on_chunk
        self.embeddings = RedisEmbeddingStore(backend, self.info)
        self.features = RedisFeatureStore(backend, self.info.version)

    async def run(self) -> LoadReport:
        started = time.perf_counter()
        report = LoadReport(self.info.version)
        await self._claim_version()
        b = self.bundle
        history = b.user_history
        history_rows = np.flatnonzero(history.lengths()).tolist()

        async def user_embeddings(lo: int, hi: int) -> None:
            await self.embeddings.set_batch("user", b.user_ids[lo:hi], b.user_embeddings[lo:hi])

        async def item_embeddings(lo: int, hi: int) -> None:
            await self.embeddings.set_batch("item", b.item_ids[lo:hi], b.item_embeddings[lo:hi])

        async def user_features(lo: int, hi: int) -> None:
            await self.features.set_rows("user", b.user_ids[lo:hi], b.user_features[lo:hi])

        async def item_features(lo: int, hi: int) -> None:
            await self.features.set_rows("item", b.item_ids[lo:hi], b.item_features[lo:hi])

        async def seen(lo: int, hi: int) -> None:
            seen_sets = {b.user_ids[r]: history.items_of(r) for r in history_rows[lo:hi]}
            await self.features.add_seen(seen_sets, ttl_s=self.cfg.seen_ttl_s)

        tables: list[tuple[str, int, Writer]] = [
            ("user_embeddings", len(b.user_ids), user_embeddings),
            ("item_embeddings", len(b.item_ids), item_embeddings),
            ("user_features", len(b.user_ids), user_features),
            ("item_features", len(b.item_ids), item_features),
            ("seen", len(history_rows), seen),
        ]
        total = sum(n for _, n, _ in tables)
        with tqdm(total=total, desc=f"load {self.info.version}", unit="row", disable=not self.cfg.progress) as bar:
            for table, n_rows, write in tables:
                report.rows[table] = n_rows
                report.skipped_rows[table] = await self._load_table(table, n_rows, write, bar)
        await self._load_popular()
        report.seconds = time.perf_counter() - started
        if self.cfg.activate:
            report.previous = await versions.switch(self.backend, self.info.version)
            if self.cfg.drop_previous and report.previous not in (None, self.info.version):
                report.dropped_keys = await versions.drop(self.backend, report.previous)
        return report

    async def _claim_version(self) -> None:
        """Write the version's metadata, or check that an earlier (interrupted) run used the same."""
        meta_key = keys.version_meta(self.info.version)
        if await self.backend.control(Command("GET", meta_key)) is not None:
            existing = await versions.read_meta(self.backend, self.info.version)
            if existing.triton_version is None and existing == replace(self.info, triton_version=None):
                await versions.write_meta(self.backend, self.info)  # loaded before metadata named it
                return
            if existing != self.info:
                raise VersionError(
                    f"{existing.dtype} x {existing.dim} to resume version {self.info.version!r} as loaded",
                    f"{self.info.dtype} x {self.info.dim}",
                    "load it with the same --dtype, or under another model version",
                )
            return
        await versions.write_meta(self.backend, self.info)

    async def _load_table(self, table: str, n_rows: int, write: Writer, bar: tqdm) -> int:
        ckpt = keys.checkpoint(self.info.version, f"load:{table}")
        raw = await self.backend.control(Command("GET", ckpt))
        done = min(int(raw), n_rows) if raw is not None else 0
        if done:
            log.info("%s: resuming after %d of %d rows", table, done, n_rows)
        bar.update(done)
        skipped = done
        while done < n_rows:
            end = min(done + self.cfg.chunk_rows, n_rows)
            await write(done, end)
            # The checkpoint moves only after the chunk is fully acknowledged.
            await self.backend.control(Command("SET", ckpt, (end,)))
            bar.update(end - done)
            done = end
            if self.on_chunk is not None:
                self.on_chunk(table, done)
        return skipped

    async def _load_popular(self) -> None:
        store = RedisPrecomputedStore(self.backend)
        now = time.time()
        for segment, items in self.bundle.popular.items():
            if segment not in schema.SEGMENTS:
                log.warning("skipping popular list for unknown segment %r", segment)
                continue
            # Rank-based scores: the list is already ordered by popularity.
            scores = tuple(float(len(items) - r) for r in range(len(items)))
            await store.set_popular(segment, Recommendations(tuple(items), scores, self.info.version, now))


async def load(backend: Backend, bundle: Bundle, cfg: LoadConfig, on_chunk: ChunkHook | None = None) -> LoadReport:
    return await Loader(backend, bundle, cfg, on_chunk).run()
