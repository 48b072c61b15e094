"""Small in-memory artifact bundles for data-plane tests (no training)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from export.artifacts import Bundle
from export.history import UserHistory
from export.precompute import BatchScoreFn, Candidates
from orchestrator import schema


def random_bundle(path: Path, n_users: int = 500, n_items: int = 400, dim: int = 8, version: str = "t-v1") -> Bundle:
    # Seeded from the version's bytes: hash() of a str changes with every interpreter (PYTHONHASHSEED).
    rng = np.random.default_rng(zlib.crc32(version.encode()))
    users = [f"u{i}" for i in range(n_users)]
    items = [f"i{i}" for i in range(n_items)]

    def table(n: int) -> np.ndarray:
        x = rng.normal(size=(n, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def feats(n: int, spec: tuple[tuple[str, int], ...]) -> np.ndarray:
        return np.stack([rng.integers(0, size, n) for _, size in spec], axis=1).astype(np.int64)

    history = {u: [items[j] for j in rng.choice(n_items, rng.integers(0, 12), replace=False)] for u in users}
    popular = {segment: items[:20] for segment in schema.SEGMENTS}
    manifest = {"model_version": version, "embedding_dim": dim, "n_users": n_users, "n_items": n_items}
    return Bundle(
        path, manifest, users, items, table(n_users), table(n_items),
        feats(n_users, schema.USER_FEATURES), feats(n_items, schema.ITEM_FEATURES),
        UserHistory.from_dict(users, items, history), popular,
    )  # fmt: skip


def reference_scores(reference: Candidates, row: int, run: BatchScoreFn) -> dict[str, float]:
    """The model's score (``run``: ONNX Runtime, fp32) of every candidate of one user, the candidates and rows
    ``offline_top_n`` ranks."""
    items = reference.for_user(row)
    return dict(zip(items, run(reference.request(row, items).tensors()).reshape(-1).tolist(), strict=True))
