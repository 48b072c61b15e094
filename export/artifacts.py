"""The artifact bundle that training writes and every later offline step reads.

Layout of ``build/artifacts/<dataset>/v<N>/``, one folder per model version N (``python -m export all
--version N``), so versions live side by side and building one never overwrites another (all generated,
git-ignored):

| file | content |
|---|---|
| ``manifest.json`` | model version, dataset, embedding dim, counts, metrics, git commit, time |
| ``users.json`` / ``items.json`` | ids (strings), row i of every table below belongs to ids[i] |
| ``user_embeddings.npy`` / ``item_embeddings.npy`` | float32 [n, dim], L2-normalised |
| ``user_features.npy`` / ``item_features.npy`` | int64 [n, width] (``orchestrator.schema``) |
| ``user_history_*.npy`` | item rows each user interacted with (seen, excluded at serving): ``export.history`` |
| ``popular.json`` | segment -> most popular item ids (the last-resort fallback) |
| ``item_index.faiss`` / ``item_index.json`` | FAISS index over item embeddings and its manifest |
| ``two_tower.pt`` / ``ranker.pt`` | torch state dicts (eager models, for parity checks) |
| ``metrics.json`` | offline evaluation |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.history import UserHistory

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = REPO_ROOT / "build"
MODEL_REPOSITORY = REPO_ROOT / "model_repository"


def artifacts_dir(dataset: str, build_dir: Path = BUILD_DIR, version: int = 1) -> Path:
    """The bundle folder of ``dataset``'s model version ``version`` (its Triton version number too)."""
    if version < 1:
        raise ValueError(f"model version must be an integer >= 1, got {version}")
    return build_dir / "artifacts" / dataset / f"v{version}"


@dataclass
class Bundle:
    """In-memory view of an artifact bundle (everything but the torch models)."""

    path: Path
    manifest: dict[str, Any]
    user_ids: list[str]
    item_ids: list[str]
    user_embeddings: np.ndarray
    item_embeddings: np.ndarray
    user_features: np.ndarray
    item_features: np.ndarray
    user_history: UserHistory
    popular: dict[str, list[str]]

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])


def write_json(path: Path, value: Any) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a JSON file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)


def save_bundle(bundle: Bundle) -> None:
    bundle.path.mkdir(parents=True, exist_ok=True)
    write_json(bundle.path / "users.json", bundle.user_ids)
    write_json(bundle.path / "items.json", bundle.item_ids)
    np.save(bundle.path / "user_embeddings.npy", bundle.user_embeddings.astype(np.float32))
    np.save(bundle.path / "item_embeddings.npy", bundle.item_embeddings.astype(np.float32))
    np.save(bundle.path / "user_features.npy", bundle.user_features.astype(np.int64))
    np.save(bundle.path / "item_features.npy", bundle.item_features.astype(np.int64))
    bundle.user_history.save(bundle.path)
    write_json(bundle.path / "popular.json", bundle.popular)
    # The manifest goes last: its presence marks a complete bundle.
    write_json(bundle.path / "manifest.json", bundle.manifest)


def load_bundle(path: Path) -> Bundle:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no artifact bundle at {path} (missing manifest.json); run `python -m export train` first"
        )
    user_ids = json.loads((path / "users.json").read_text())
    item_ids = json.loads((path / "items.json").read_text())
    bundle = Bundle(
        path=path,
        manifest=json.loads(manifest_path.read_text()),
        user_ids=user_ids,
        item_ids=item_ids,
        user_embeddings=np.load(path / "user_embeddings.npy"),
        item_embeddings=np.load(path / "item_embeddings.npy"),
        user_features=np.load(path / "user_features.npy"),
        item_features=np.load(path / "item_features.npy"),
        user_history=UserHistory.read(path, user_ids, item_ids),
        popular=json.loads((path / "popular.json").read_text()),
    )
    for name, ids, table in (
        ("user_embeddings", bundle.user_ids, bundle.user_embeddings),
        ("item_embeddings", bundle.item_ids, bundle.item_embeddings),
        ("user_features", bundle.user_ids, bundle.user_features),
        ("item_features", bundle.item_ids, bundle.item_features),
    ):
        if len(table) != len(ids):
            raise ValueError(f"{path}/{name}.npy has {len(table)} rows, but the id list has {len(ids)}")
    return bundle
