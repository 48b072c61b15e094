"""The offline pipeline end to end: data -> train -> evaluate -> bundle -> Triton repository -> FAISS."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from export import model_repository
from export.artifacts import (
    BUILD_DIR,
    MODEL_REPOSITORY,
    Bundle,
    artifacts_dir,
    load_bundle,
    save_bundle,
    write_json,
)
from export.data import (
    Dataset,
    SyntheticSpec,
    generate_synthetic,
    load_movielens,
    movielens_dir,
    movielens_small_dir,
    read_spec,
    temporal_split,
)
from export.evaluate import MAX_EVAL_USERS, ScoreFn, default_context, evaluate
from export.faiss_index import build_index
from export.history import UserHistory
from export.interactions import check_name, load_movielens_small, read_interactions
from export.models import Ranker
from export.train import TrainConfig, TrainedModels, random_context, train
from export.triton_config import BatchingSpec
from orchestrator import schema

log = logging.getLogger(__name__)

# The generated data sets by name: the default (MovieLens-100K-sized) and the scale profile, 1M users x 1M
# items with ~120M interactions (`make up DATASET=synthetic-1m`; docs/SCALE.md).
SYNTHETIC_PROFILES = {
    "synthetic": SyntheticSpec(),
    "synthetic-1m": SyntheticSpec(n_users=1_000_000, n_items=1_000_000),
}
# The built-in data sets; an own one (``python -m export all --interactions FILE --name NAME``) is any other
# name, its bundle under build/artifacts/NAME like theirs.
DATASETS = (*SYNTHETIC_PROFILES, "movielens", "movielens-small")
POPULAR_LIST_LENGTH = 100


def synthetic_dir(build_dir: Path = BUILD_DIR, name: str = "synthetic") -> Path:
    return build_dir / "data" / name


def prepare_dataset(
    name: str, build_dir: Path = BUILD_DIR, spec: SyntheticSpec | None = None, data_dir: Path | None = None
) -> Dataset:
    """``synthetic`` is generated (seeded) into ``data_dir`` (default build/data/synthetic) unless a
    complete one is there already: with no ``spec``, any (``u.data`` is the completion marker); with a
    ``spec``, one generated from that very spec (its ``spec.json``). ``synthetic-1m`` likewise, from its
    own spec, in build/data/synthetic-1m. ``movielens`` is read where it
    lies: ``data_dir``, else $RECSERVE_MOVIELENS_DIR or ../shared/data/movielens-100k; ``movielens-small``
    (MovieLens latest-small) too: ``data_dir``, else $RECSERVE_MOVIELENS_SMALL_DIR or
    ../shared/data/movielens-latest-small, read through the own-data contract (``export.interactions``)."""
    if name in SYNTHETIC_PROFILES:
        folder = Path(data_dir) if data_dir is not None else synthetic_dir(build_dir, name)
        if spec is None and name != "synthetic":
            spec = SYNTHETIC_PROFILES[name]
        complete = (folder / "u.data").is_file()
        if not complete or (spec is not None and read_spec(folder) != spec):
            log.info("generating the %s data set into %s", name, folder)
            generate_synthetic(folder, spec or SYNTHETIC_PROFILES[name])
        return load_movielens(folder, name)
    if name == "movielens":
        return load_movielens(Path(data_dir) if data_dir is not None else movielens_dir(), "movielens-100k")
    if name == "movielens-small":
        return load_movielens_small(Path(data_dir) if data_dir is not None else movielens_small_dir())
    raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")


def ranker_scorer(ranker: Ranker, models: TrainedModels) -> ScoreFn:
    """Eager-torch scoring of one user's candidates, with the offline context (home, web)."""

    def score(user_row: int, candidates: np.ndarray) -> np.ndarray:
        n = len(candidates)
        with torch.no_grad():
            out = ranker(
                torch.from_numpy(np.repeat(models.user_embeddings[user_row : user_row + 1], n, axis=0)),
                torch.from_numpy(models.item_embeddings[candidates]),
                torch.from_numpy(np.repeat(models.user_features[user_row : user_row + 1], n, axis=0)),
                torch.from_numpy(models.item_features[candidates]),
                torch.from_numpy(default_context(n)),
            )
        return out.numpy().reshape(-1)

    return score


def popular_lists(data: Dataset, length: int = POPULAR_LIST_LENGTH) -> dict[str, list[str]]:
    """Most-interacted items overall and per user segment."""
    segments = np.array([schema.user_segment(int(b)) for b in data.user_features[:, 0]])
    lists: dict[str, list[str]] = {}
    for segment in schema.SEGMENTS:
        mask = (
            np.ones(data.n_interactions, bool)
            if segment == schema.GLOBAL_SEGMENT
            else (segments[data.user_idx] == segment)
        )
        counts = np.bincount(data.item_idx[mask], minlength=data.n_items)
        if counts.sum() == 0:
            counts = np.bincount(data.item_idx, minlength=data.n_items)
        top = np.argsort(-counts, kind="stable")[:length]
        lists[segment] = [data.item_ids[i] for i in top]
    return lists


class RankerTables(Protocol):
    """Per-user and per-item ranker inputs, row-aligned with the ids (a trained model or a bundle)."""

    user_embeddings: np.ndarray
    item_embeddings: np.ndarray
    user_features: np.ndarray
    item_features: np.ndarray


def ranker_batch(
    tables: RankerTables, users: np.ndarray, items: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The ranker's inputs for the (user, item) rows given, with random request contexts."""
    return {
        "user_embedding": tables.user_embeddings[users],
        "item_embedding": tables.item_embeddings[items],
        "user_features": tables.user_features[users],
        "item_features": tables.item_features[items],
        "context_features": random_context(rng, len(users)),
    }


def real_batches(
    models: TrainedModels, data: Dataset, sizes: tuple[int, ...], seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Ranker inputs built from real (user, item) pairs of the data set, for the parity check."""
    rng = np.random.default_rng(seed)
    batches = []
    for size in sizes:
        rows = rng.integers(0, data.n_interactions, size)
        batches.append(ranker_batch(models, data.user_idx[rows], data.item_idx[rows], rng))
    return batches


def _weights_digest(module: torch.nn.Module) -> str:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()[:8]


def run_all(
    dataset: str,
    cfg: TrainConfig | None = None,
    version: int = 1,
    build_dir: Path = BUILD_DIR,
    repo: Path = MODEL_REPOSITORY,
    batching: BatchingSpec | None = None,
    synthetic: SyntheticSpec | None = None,
    data_dir: Path | None = None,
    eval_max_users: int | None = MAX_EVAL_USERS,
    data: Dataset | None = None,
    extra_manifest: dict[str, Any] | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Bundle:
    """Data -> train -> evaluate -> bundle (``build_dir``/artifacts/<dataset>/v<version>) -> Triton models
    (``repo``/<model>/<version>) -> FAISS index, beside every other version. ``data_dir`` and
    ``synthetic``: see ``prepare_dataset``; ``data``: a data set already read (an own one, ``run_own``),
    ``extra_manifest`` goes into its manifest, ``extra_files`` (name -> JSON value) into its folder;
    evaluation takes a seeded sample of ``eval_max_users`` users past that many (None: every user). A run
    that fails removes the bundle folder it created."""
    cfg = cfg or TrainConfig()
    if data is None:
        data = prepare_dataset(dataset, build_dir, synthetic, data_dir)
    path = artifacts_dir(dataset, build_dir, version)
    created = not path.exists()
    try:
        return _train_and_export(
            data, dataset, cfg, version, path, repo, batching, eval_max_users, extra_manifest, extra_files or {}
        )
    except BaseException:
        if created:  # nothing half written: a bundle is whole (manifest last) or not there
            shutil.rmtree(path, ignore_errors=True)
        raise


def _train_and_export(
    data: Dataset,
    dataset: str,
    cfg: TrainConfig,
    version: int,
    path: Path,
    repo: Path,
    batching: BatchingSpec | None,
    eval_max_users: int | None,
    extra_manifest: dict[str, Any] | None,
    extra_files: dict[str, Any],
) -> Bundle:
    started = time.perf_counter()
    split = temporal_split(data)
    log.info("%s: %d users, %d items, %d interactions", data.name, data.n_users, data.n_items, data.n_interactions)
    models = train(data, split, cfg)
    train_seconds = time.perf_counter() - started
    metrics = evaluate(
        data,
        split,
        models.user_embeddings,
        models.item_embeddings,
        ranker_scorer(models.ranker, models),
        max_users=eval_max_users,
    )
    model_version = f"{data.name}-v{version}-{_weights_digest(models.ranker)}"
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "metrics.json", metrics)
    for name, value in extra_files.items():
        write_json(path / name, value)
    history = UserHistory.from_rows(data.user_ids, data.item_ids, data.user_idx, data.item_idx)
    manifest = {
        "model_version": model_version,
        "triton_version": version,
        "dataset": data.name,
        "embedding_dim": cfg.embedding_dim,
        "n_users": data.n_users,
        "n_items": data.n_items,
        "n_interactions": data.n_interactions,
        "train_config": asdict(cfg),
        "inputs": [asdict(spec) for spec in schema.ranker_inputs(cfg.embedding_dim)],
        # The models' feature vocabulary sizes (load_ranker rebuilds the ranker from them).
        "feature_sizes": {
            "user": [list(column) for column in data.user_feature_spec],
            "item": [list(column) for column in data.item_model_features],
        },
        "metrics": metrics,
        "git_commit": model_repository.git_commit(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": round(train_seconds, 1),
        **(extra_manifest or {}),
    }
    bundle = Bundle(
        path,
        manifest,
        data.user_ids,
        data.item_ids,
        models.user_embeddings,
        models.item_embeddings,
        models.user_features,
        models.item_features,
        history,
        popular_lists(data),
    )
    torch.save(models.ranker.state_dict(), path / "ranker.pt")
    torch.save(models.two_tower.state_dict(), path / "two_tower.pt")
    export_started = time.perf_counter()
    max_batch = (batching or BatchingSpec()).max_batch_size
    parity = model_repository.export_ranker(
        models.ranker, version, real_batches(models, data, (1, 7, max_batch)), manifest, repo, batching
    )
    manifest["export_seconds"] = round(time.perf_counter() - export_started, 2)
    manifest["parity_max_abs_diff"] = max(r.max_abs_diff for r in parity)
    index = build_index(
        models.item_embeddings,
        data.item_ids,
        model_version,
        path / "item_index.faiss",
        queries=models.user_embeddings,
    )
    manifest["index"] = asdict(index)
    save_bundle(bundle)  # the manifest is written last: a bundle is complete once it exists
    log.info("done in %.1f s: %s", time.perf_counter() - started, model_version)
    return bundle


def run_own(
    interactions: Path,
    name: str,
    users: Path | None = None,
    items: Path | None = None,
    categorical: tuple[str, ...] = (),
    **options: Any,
) -> Bundle:
    """An own interaction log (and feature tables) -> everything ``run_all`` builds, under
    build/artifacts/``name``. The files are read and checked in full before anything is written."""
    check_name(name)
    own = read_interactions(Path(interactions), name, users=users, items=items, categorical=categorical)
    source = {
        "interactions": str(Path(interactions).resolve()),
        "users": str(Path(users).resolve()) if users else None,
        "items": str(Path(items).resolve()) if items else None,
    }
    extra = {"features": own.describe(), "source": source, "event_types": list(own.dataset.event_types)}
    files = {"feature_vocabularies.json": own.vocabularies()}
    return run_all(name, data=own.dataset, extra_manifest=extra, extra_files=files, **options)


def _feature_spec(manifest: dict[str, Any], kind: str) -> tuple[tuple[str, int], ...]:
    """A bundle's feature vocabulary sizes; orchestrator.schema's for bundles written before they were kept."""
    sizes = manifest.get("feature_sizes", {}).get(kind)
    if sizes is None:
        return schema.USER_FEATURES if kind == "user" else schema.ITEM_FEATURES
    return tuple((str(name), int(size)) for name, size in sizes)


def load_ranker(bundle_path: Path) -> Ranker:
    manifest = json.loads((bundle_path / "manifest.json").read_text())
    ranker = Ranker(
        int(manifest["embedding_dim"]),
        user_features=_feature_spec(manifest, "user"),
        item_features=_feature_spec(manifest, "item"),
    )
    ranker.load_state_dict(torch.load(bundle_path / "ranker.pt"))
    ranker.eval()
    return ranker


def export_bundle(bundle_path: Path, repo: Path = MODEL_REPOSITORY, batching: BatchingSpec | None = None) -> None:
    """Export a bundle's trained ranker (``ranker.pt``) to ``repo`` again, without training: what ``make up``
    does when the repository's ranker belongs to another data set or version. Parity is checked on
    batches of the bundle's own (user, item) rows, as at training time."""
    bundle = load_bundle(bundle_path)
    ranker = load_ranker(bundle_path)
    rng = np.random.default_rng(0)
    batches = []
    for size in (1, 7, (batching or BatchingSpec()).max_batch_size):
        users = rng.integers(0, len(bundle.user_ids), size)
        items = rng.integers(0, len(bundle.item_ids), size)
        batches.append(ranker_batch(bundle, users, items, rng))
    version = int(bundle.manifest.get("triton_version", 1))
    model_repository.export_ranker(ranker, version, batches, bundle.manifest, repo, batching)


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    names = [k for k in metrics if not k.startswith("_")]
    columns = list(metrics[names[0]])
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{metrics[name][c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)
