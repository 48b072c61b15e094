"""Write the Triton model repository: model files + parity checks + configs for both profiles.

``model_repository/<model>/config.pbtxt`` is the committed ``gpu-t4`` config; version folders hold the
generated model files (git-ignored). The ``cpu`` profile is rendered into ``build/triton/cpu``: its
version folders hold the Python-backend ``model.py`` and a symlink to the very same model file.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export import model_export, ranker_factored, triton_config
from export.artifacts import BUILD_DIR, MODEL_REPOSITORY, REPO_ROOT, write_json
from export.errors import ModelRepositoryError
from export.models import Ranker
from export.triton_config import BatchingSpec, ModelSpec, Profile
from orchestrator import schema

log = logging.getLogger(__name__)

PYTHON_MODEL = Path(__file__).resolve().parent / "triton_python_backend" / "model.py"
CPU_REPOSITORY = BUILD_DIR / "triton" / "cpu"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_gpu_configs(models: tuple[ModelSpec, ...], repo: Path = MODEL_REPOSITORY) -> list[Path]:
    paths = []
    for model in models:
        path = repo / model.name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(triton_config.render(triton_config.build_config(model, "gpu-t4")))
        paths.append(path)
    return paths


def export_ranker(
    ranker: Ranker,
    version: int,
    real_batches: list[dict[str, np.ndarray]],
    manifest: dict[str, Any],
    repo: Path = MODEL_REPOSITORY,
    batching: BatchingSpec | None = None,
) -> list[model_export.ParityReport]:
    """Export to ONNX and TorchScript, parity-check both (random + real batches of 1, 7 and the max),
    write the gpu-t4 configs and one manifest per export. Raises ParityError past 1e-5."""
    models = triton_config.ranker_models(ranker.embedding_dim, batching)
    max_batch = models[0].batching.max_batch_size
    random_batches = [model_export.example_inputs(ranker.embedding_dim, n, seed=n) for n in (1, 7, max_batch)]
    batches = {"random": random_batches, "real": real_batches}
    exporters: dict[str, Callable[[Path], Callable[[dict[str, np.ndarray]], np.ndarray]]] = {}
    reports = []
    for model in models:
        target = repo / model.name / str(version) / model.filename
        started = time.perf_counter()
        if model.runtime == "onnxruntime":
            model_export.export_onnx(ranker, target)
            exporters[model.name] = model_export.onnx_runner
        else:
            model_export.export_torchscript(ranker, target)
            exporters[model.name] = lambda p: model_export.torchscript_runner(p, ranker.embedding_dim)
        export_seconds = time.perf_counter() - started
        model_reports = model_export.check_parity(model.name, exporters[model.name](target), ranker, batches)
        reports.extend(model_reports)
        write_json(
            target.parent / "manifest.json",
            manifest
            | {
                "model": model.name,
                "runtime": model.runtime,
                "triton_version": version,
                "file": model.filename,
                "file_bytes": target.stat().st_size,
                "export_seconds": round(export_seconds, 3),
                "inputs": [vars(spec) for spec in schema.ranker_inputs(ranker.embedding_dim)],
                "output": {"name": model.output_name, "dtype": "float32", "width": 1},
                "max_batch_size": max_batch,
                "parity": [vars(r) for r in model_reports],
                "git_commit": git_commit(),
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    write_gpu_configs(models, repo)
    return reports


def check_repository(repo: Path, models: tuple[ModelSpec, ...]) -> dict[str, list[int]]:
    """Every model has a config that parses and at least one version with its model file."""
    versions: dict[str, list[int]] = {}
    for model in models:
        folder = repo / model.name
        config_path = folder / "config.pbtxt"
        if not config_path.is_file():
            raise ModelRepositoryError(model.name, f"a config at {config_path}", "no file")
        triton_config.parse(config_path.read_text())
        found = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        if not found:
            raise ModelRepositoryError(model.name, f"a version folder under {folder}", "none")
        for version in found:
            model_file = folder / str(version) / model.filename
            if not model_file.is_file():
                raise ModelRepositoryError(
                    model.name, f"model file {model_file}", "no file (run `python -m export all`)"
                )
        versions[model.name] = found
    return versions


def render_profile_repository(
    profile: Profile,
    dest: Path = CPU_REPOSITORY,
    source: Path = MODEL_REPOSITORY,
    embedding_dim: int = 128,
    batching: BatchingSpec | None = None,
    models: tuple[ModelSpec, ...] | None = None,
) -> Path:
    """A servable repository for ``profile`` whose version folders point at ``source``'s model files."""
    models = models or triton_config.ranker_models(embedding_dim, batching)
    versions = check_repository(source, models) if profile == "cpu" else {}
    if dest.exists():
        shutil.rmtree(dest)
    for model in models:
        folder = dest / model.name
        folder.mkdir(parents=True)
        (folder / "config.pbtxt").write_text(triton_config.render(triton_config.build_config(model, profile)))
        for version in versions.get(model.name, []):
            version_dir = folder / str(version)
            version_dir.mkdir()
            fill_version_folder(version_dir, model, source / model.name / str(version) / model.filename)
    return dest


def fill_version_folder(version_dir: Path, model: ModelSpec, model_file: Path) -> None:
    """A cpu-profile version folder: the Python-backend model.py, a link to ``model_file``, and for ONNX the
    one-user graph that model.py runs for a request of one user's candidates (export/ranker_factored.py); a
    model of another architecture gets none and is served by its own file alone."""
    shutil.copy(PYTHON_MODEL, version_dir / "model.py")
    (version_dir / model.filename).symlink_to(model_file.resolve())
    if model.runtime != "onnxruntime":
        return
    try:
        ranker_factored.write_factored_model(model_file, version_dir / ranker_factored.FACTORED_FILE)
    except ranker_factored.FactoredParityError as exc:
        log.warning("%s: no factored graph, every request runs %s: %s", version_dir, model_file.name, exc)
