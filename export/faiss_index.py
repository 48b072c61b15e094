"""Build the FAISS item index: exact inner product below a size threshold, else IVF with an HNSW coarse
quantizer (``IVF{nlist}_HNSW32,Flat``, as the reference capacity plan uses) with ``nprobe`` raised until
recall@100 against exact search reaches the target."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from export.artifacts import write_json
from export.errors import IndexBuildError
from orchestrator.retrieval import IndexManifest

log = logging.getLogger(__name__)

EXACT_THRESHOLD = 50_000
RECALL_TARGET = 0.95


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size


def build_index(
    item_embeddings: np.ndarray,
    item_ids: list[str],
    model_version: str,
    path: Path,
    queries: np.ndarray | None = None,
    exact_threshold: int = EXACT_THRESHOLD,
    recall_target: float = RECALL_TARGET,
    seed: int = 0,
) -> IndexManifest:
    """Write ``path`` (the index) and ``path.with_suffix('.json')`` (manifest + row -> item id)."""
    vectors = np.ascontiguousarray(item_embeddings, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(item_ids):
        raise IndexBuildError(
            f"expected item_embeddings of shape [{len(item_ids)}, dim], but found {list(vectors.shape)}"
        )
    if not np.isfinite(vectors).all():
        raise IndexBuildError("expected finite item embeddings, but found NaN or inf")
    n, dim = vectors.shape
    rng = np.random.default_rng(seed)
    if queries is None:
        queries = vectors[rng.choice(n, size=min(n, 1000), replace=False)]
    queries = np.ascontiguousarray(queries[:1000], dtype=np.float32)
    k = min(100, n)
    if n < exact_threshold:
        index: faiss.Index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        factory, nprobe, recall = "Flat", 0, 1.0
    else:
        nlist = 1 << round(math.log2(4 * math.sqrt(n)))
        factory = f"IVF{nlist}_HNSW32,Flat"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        train = vectors[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.train(train)
        index.add(vectors)
        exact = faiss.IndexFlatIP(dim)
        exact.add(vectors)
        _, truth = exact.search(queries, k)
        ivf = faiss.extract_index_ivf(index)
        nprobe, recall = 1, 0.0
        while True:
            ivf.nprobe = nprobe
            _, found = index.search(queries, k)
            recall = recall_at_k(found, truth)
            log.info("nprobe=%d recall@%d=%.4f", nprobe, k, recall)
            if recall >= recall_target or nprobe >= nlist:
                break
            nprobe = min(nlist, nprobe * 2)
        if recall < recall_target:
            raise IndexBuildError(f"expected recall@{k} >= {recall_target}, but found {recall:.4f} at nprobe={nprobe}")
    manifest = IndexManifest(model_version, dim, "inner_product", n, factory, nprobe, round(recall, 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    write_json(path.with_suffix(".json"), asdict(manifest) | {"item_ids": list(item_ids)})
    return manifest
