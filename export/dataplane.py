"""The data plane as the offline side uses it: open the store backend from Redis URLs, load a bundle and
pre-compute every user's list, and the few store parts the data-plane benchmark times.

Export is the one package outside the service that uses the store library (``orchestrator/store``,
the in-process ranker and retriever) to load and pre-compute. The local stack (``stack/``), the
benchmarks (``bench/``) and the load test call these functions instead of importing the service.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from export.artifacts import MODEL_REPOSITORY, Bundle
from orchestrator import schema
from orchestrator.store import keys
from orchestrator.store.backend import Backend
from orchestrator.store.cluster import ClusterBackend
from orchestrator.store.embeddings import RedisEmbeddingStore
from orchestrator.store.errors import StoreError
from orchestrator.store.sharded import ShardedBackend
from orchestrator.store.versions import VersionInfo

if TYPE_CHECKING:
    # Imported where used: `python -m export load` should not pay for ONNX Runtime and FAISS.
    from orchestrator.ranking.onnx_ranker import OnnxRanker
    from orchestrator.retrieval import FaissRetriever

__all__ = [
    "Backend",
    "StoreError",
    "cluster_backend",
    "default_onnx_model",
    "drop_version",
    "embedding_key",
    "embedding_store",
    "faiss_retriever",
    "load_and_precompute",
    "onnx_ranker",
    "open_backend",
    "schema",
    "sharded_backend",
]


def sharded_backend(urls: Sequence[str], timeout_ms: float = 5000.0) -> ShardedBackend:
    """Standalone shards of one hash ring, as the orchestrator's RECSERVE_REDIS_URLS lists them."""
    return ShardedBackend.from_urls(list(urls), timeout_ms=timeout_ms)


async def cluster_backend(url: str, timeout_ms: float = 5000.0) -> ClusterBackend:
    """A Redis Cluster, its topology discovered from any one node's URL."""
    return await ClusterBackend.connect(url, timeout_ms=timeout_ms)


async def open_backend(urls: Sequence[str], cluster: bool = False, timeout_ms: float = 5000.0) -> Backend:
    """``urls``: the shards of one ring, or (``cluster``) one seed node of a Redis Cluster."""
    if cluster:
        if len(urls) != 1:
            raise ValueError(f"a cluster takes one seed URL, got {len(urls)}")
        return await cluster_backend(urls[0], timeout_ms)
    return sharded_backend(urls, timeout_ms)


def default_onnx_model(bundle_manifest: dict[str, object], repo: Path = MODEL_REPOSITORY) -> Path:
    """The bundle's ranker as exported into the Triton model repository (its Triton version folder)."""
    return repo / "ranker_onnx" / str(bundle_manifest.get("triton_version", 1)) / "model.onnx"


def onnx_ranker(model_path: Path, model_version: str, threads: int = 1) -> OnnxRanker:
    """The ranker in process (ONNX Runtime), as pre-compute runs it."""
    from orchestrator.ranking.onnx_ranker import OnnxRanker

    return OnnxRanker(model_path, model_version, intra_op_threads=threads)


def faiss_retriever(index_path: Path) -> FaissRetriever:
    from orchestrator.retrieval import FaissRetriever

    return FaissRetriever(index_path)


async def load_and_precompute(
    redis: str | Sequence[str] | Backend,
    bundle: Bundle,
    onnx_path: Path,
    progress: bool = True,
    threads: int = 0,
    processes: int = 1,
) -> None:
    """Load the bundle into Redis (activating its version) and pre-compute every user's list.

    ``redis``: one URL, several URLs (shards of one hash ring, as the orchestrator's RECSERVE_REDIS_URLS
    lists them), or a backend the caller owns (a Redis Cluster, say); a backend is not closed here.
    ``threads``: ONNX Runtime intra-op threads (0: one per core of the machine). ``processes`` > 1: pre-compute
    with that many worker processes (``precompute_processes``: one per core, each with its share of the
    users and its own connections), which takes URLs, not a backend."""
    from export.load import LoadConfig, load
    from export.precompute import PrecomputeConfig, precompute, precompute_processes

    owned = isinstance(redis, Sequence)  # a str is a Sequence too
    urls: list[str] = []
    if isinstance(redis, Sequence):
        urls = [redis] if isinstance(redis, str) else list(redis)
        backend: Backend = sharded_backend(urls)
    else:
        backend = redis
    if processes > 1 and not urls:
        raise ValueError("pre-compute in several processes needs Redis URLs (each process connects itself)")
    try:
        await load(backend, bundle, LoadConfig(progress=progress))
        index_path = bundle.path / "item_index.faiss"
        if processes > 1:
            await precompute_processes(
                urls, bundle.path, index_path, onnx_path, PrecomputeConfig(), processes, progress
            )
            return
        retriever = faiss_retriever(index_path)
        ranker = onnx_ranker(onnx_path, bundle.model_version, threads or (os.cpu_count() or 1))
        await precompute(backend, bundle, retriever, ranker, PrecomputeConfig(), progress=progress)
    finally:
        if owned:
            await backend.aclose()


def embedding_store(backend: Backend, version: str, dim: int, dtype: str = "fp32") -> RedisEmbeddingStore:
    """The embedding store of one data version (batched reads and writes, one pipeline per shard)."""
    return RedisEmbeddingStore(backend, VersionInfo(version, dim, dtype))


def embedding_key(version: str, kind: Literal["user", "item"], entity_id: str) -> str:
    """The Redis key of one stored embedding."""
    return keys.embedding(version, kind, entity_id)


async def drop_version(backend: Backend, version: str) -> int:
    """Delete every key of one data version (SCAN + UNLINK per shard); returns how many went."""
    return await backend.delete_matching(keys.version_pattern(version), 5000)
