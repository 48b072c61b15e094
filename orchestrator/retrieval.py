"""The retrieval seam: candidates by inner product over a FAISS item index (in process)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from orchestrator.readiness import Readiness


class Retriever(Protocol):
    """``search`` returns item ids (row per query, best first) and their scores, both [n_queries, k].
    ``ready`` says whether it can search now (for /readyz); ``aclose`` releases what it holds."""

    async def search(self, user_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]: ...

    async def ready(self) -> Readiness: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class IndexManifest:
    """What ``export.faiss_index.build_index`` measured and chose; the retriever applies ``search_params``."""

    model_version: str
    dim: int
    metric: str
    n_items: int
    index_factory: str
    nprobe: int
    recall_at_100: float  # on held-out queries (disjoint from the tuning ones); 1.0 for an exact index
    # Every search parameter the build chose, by FAISS ParameterSpace name (``nprobe``, ``quantizer_efSearch``,
    # ``k_factor_rf``, ``efSearch``); empty for an exact index. Older manifests carry only ``nprobe``.
    search_params: dict[str, int] = field(default_factory=dict)
    recall_at_100_tuning: float | None = None
    full_length_k: int = 0  # lists of this depth came back full for ``full_length_fraction`` of held-out queries
    full_length_fraction: float | None = None
    build_seconds: float | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> IndexManifest:
        known = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        missing = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in raw
        ]
        if missing:
            raise ValueError(f"expected an index manifest with {missing}, but found only {sorted(raw)}")
        return cls(**known)

    def effective_search_params(self) -> dict[str, int]:
        """``search_params``, or for a manifest written before they were recorded, its ``nprobe`` alone."""
        if self.search_params:
            return dict(self.search_params)
        return {"nprobe": self.nprobe} if self.nprobe > 0 else {}


def search_params_string(params: dict[str, int]) -> str:
    """``{"nprobe": 32, "quantizer_efSearch": 64}`` -> ``"nprobe=32,quantizer_efSearch=64"``."""
    return ",".join(f"{name}={value}" for name, value in params.items())


def apply_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set ``params`` on ``index`` and on the indexes inside it (IVF quantizer, refinement base) by name,
    through FAISS's own ParameterSpace; a name the index does not have is an error, not a silent no-op."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as exc:
            kind = type(faiss.downcast_index(index)).__name__
            raise ValueError(
                f"expected search parameter {name}={value} to apply to {kind}, but FAISS has no such parameter "
                "there: the manifest was written for another index"
            ) from exc


class FaissRetriever:
    """Loads ``item_index.faiss`` + ``item_index.json`` (manifest and row -> item id)."""

    def __init__(self, index_path: Path, inline_max_s: float = 0.001) -> None:
        index_path = Path(index_path)
        meta_path = index_path.with_suffix(".json")
        if not index_path.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"FAISS index {index_path} or its manifest {meta_path} is missing")
        meta = json.loads(meta_path.read_text())
        self.manifest = IndexManifest.from_json(meta)
        self.item_ids: list[str] = list(meta["item_ids"])
        self.index = faiss.read_index(str(index_path))
        if self.index.d != self.manifest.dim or self.index.ntotal != len(self.item_ids):
            raise ValueError(
                f"index {index_path} holds {self.index.ntotal} x {self.index.d}, but its manifest says "
                f"{len(self.item_ids)} x {self.manifest.dim}"
            )
        # The parameters the build chose by measurement (recall on held-out users, full lists): without them
        # FAISS's defaults apply (nprobe 1, efSearch 16), far below the recall target.
        apply_search_params(self.index, self.manifest.effective_search_params())
        self.search_s = self._typical_search_s()
        # A thread hop costs more than a small search: the result comes back only once the worker gets the
        # GIL, which a busy event loop hands over every 5 ms (sys.getswitchinterval). Measured (service bench,
        # docs/BENCHMARKS.md, 1,700 items): the retrieval stage took 0.12-0.21 ms on the loop against
        # 0.27-3.28 ms through a thread at 1-16 concurrent clients, for a 0.04 ms search. Long searches (large
        # or exact indexes) still go to a thread so that they do not stall the loop.
        self.inline = self.search_s <= inline_max_s

    def _typical_search_s(self, runs: int = 15) -> float:
        """Median time of one search of ``n_candidates``-like depth for a random user vector."""
        query = np.random.default_rng(0).normal(size=(1, self.manifest.dim)).astype(np.float32)
        k = min(200, len(self.item_ids))
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            self.search_sync(query, k)
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    def search_sync(self, user_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        queries = np.ascontiguousarray(user_vectors, dtype=np.float32).reshape(-1, self.manifest.dim)
        k = min(k, len(self.item_ids))
        scores, rows = self.index.search(queries, k)
        ids = [[self.item_ids[r] for r in row if r >= 0] for row in rows]
        return ids, scores

    async def search(self, user_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        if self.inline:
            return self.search_sync(user_vectors, k)
        # FAISS releases the GIL during search: run it off the event loop.
        return await asyncio.to_thread(self.search_sync, user_vectors, k)

    async def ready(self) -> Readiness:
        return Readiness(True, f"ok ({len(self.item_ids)} items)")  # loaded in the constructor, or it raised

    async def aclose(self) -> None:
        """Nothing to release: the index is memory the object holds."""
