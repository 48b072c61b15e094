"""The offline pipeline end to end on a small synthetic data set (real training, real export)."""

import json
import shutil
from pathlib import Path

import pytest

from export.errors import ModelRepositoryError
from export.model_repository import check_repository, render_profile_repository
from export.triton_config import parse, ranker_models
from tests.conftest import Exported

pytestmark = pytest.mark.integration


def test_bundle_and_manifest_describe_the_export(exported: Exported) -> None:
    manifest = exported.bundle.manifest
    for field in (
        "model_version",
        "dataset",
        "embedding_dim",
        "inputs",
        "metrics",
        "git_commit",
        "created_at",
    ):
        assert field in manifest
    assert manifest["embedding_dim"] == 32 and manifest["dataset"] == "synthetic"
    assert manifest["parity_max_abs_diff"] <= 1e-5
    assert manifest["index"]["recall_at_100"] >= 0.95
    assert set(manifest["metrics"]) >= {"popularity", "retrieval", "retrieval+ranking"}
    assert exported.bundle.user_embeddings.shape == (300, 32)


def test_each_export_has_its_own_manifest_with_parity(exported: Exported) -> None:
    for model in ranker_models(32, exported.batching):
        version_dir = exported.repo / model.name / "1"
        manifest = json.loads((version_dir / "manifest.json").read_text())
        assert manifest["model"] == model.name and manifest["file_bytes"] > 0
        sizes = sorted({p["batch_size"] for p in manifest["parity"]})
        assert sizes == [1, 7, exported.batching.max_batch_size]
        assert {p["source"] for p in manifest["parity"]} == {"random", "real"}
        assert all(p["max_abs_diff"] <= 1e-5 for p in manifest["parity"])
        parse((exported.repo / model.name / "config.pbtxt").read_text())


def test_a_missing_model_file_is_named(exported: Exported, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(exported.repo, repo)
    (repo / "ranker_torchscript" / "1" / "model.pt").unlink()
    models = ranker_models(32, exported.batching)
    with pytest.raises(ModelRepositoryError, match=r"ranker_torchscript.*model file .*model.pt, but found no file"):
        check_repository(repo, models)
    with pytest.raises(ModelRepositoryError, match="ranker_torchscript"):
        render_profile_repository("cpu", tmp_path / "cpu", repo, models=models)


def test_cpu_profile_links_the_very_same_model_files(exported: Exported, tmp_path: Path) -> None:
    models = ranker_models(32, exported.batching)
    dest = render_profile_repository("cpu", tmp_path / "cpu", exported.repo, models=models)
    for model in models:
        linked = dest / model.name / "1" / model.filename
        assert linked.is_symlink()
        assert linked.resolve() == (exported.repo / model.name / "1" / model.filename).resolve()
        assert (dest / model.name / "1" / "model.py").is_file()
