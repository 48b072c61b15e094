"""Your own data end to end: a CSV log with string ids (and feature tables) through ``python -m export all
--interactions``, loaded into a real Redis, pre-computed, and served by the orchestrator ranking on a real
Triton: the answers carry the CSV's own item ids."""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from export.__main__ import main
from export.artifacts import Bundle, artifacts_dir, load_bundle
from export.dataplane import load_and_precompute, sharded_backend
from export.model_repository import render_profile_repository
from export.triton_config import BatchingSpec, ranker_models
from orchestrator.store.precomputed import RedisPrecomputedStore
from stack.redis_local import start_server
from stack.triton_launcher import TritonServer
from tests.conftest import Exported, Stack, running_orchestrator
from tests.own_data import CATEGORIES, write_shop

pytestmark = pytest.mark.integration


@dataclass
class OwnStack:
    bundle: Bundle
    csv_items: set[str]
    csv_users: list[str]
    redis_url: str
    app_url: str


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    tmp = tmp_path_factory.mktemp("own-data")
    interactions, users, items = write_shop(tmp / "data", n_users=200, n_items=120, per_user=15)
    build, repo = tmp / "build", tmp / "model_repository"
    # The README's first command, on a test-sized model.
    argv = ["all", "--interactions", str(interactions), "--users", str(users), "--items", str(items)]
    argv += ["--name", "shop", "--build-dir", str(build), "--repo", str(repo), "--dim", "16"]
    assert main([*argv, "--retrieval-epochs", "2", "--ranker-epochs", "1"]) == 0
    bundle = load_bundle(artifacts_dir("shop", build))
    with interactions.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    redis = start_server()
    triton = None
    try:
        onnx_path = repo / "ranker_onnx" / "1" / "model.onnx"
        asyncio.run(load_and_precompute(redis.url, bundle, onnx_path, progress=False, threads=2))
        rendered = render_profile_repository("cpu", tmp / "cpu", repo, models=ranker_models(bundle.dim, None))
        triton = TritonServer(rendered, log_path=tmp / "tritonserver.log")
        triton.start()
        env = Stack(redis, Exported(bundle, build, repo, BatchingSpec()), onnx_path).env(triton.grpc_url)
        with running_orchestrator(env, tmp / "app.log") as app:
            yield OwnStack(
                bundle, {r["item_id"] for r in rows}, sorted({r["user_id"] for r in rows}), redis.url, app.url
            )
    finally:
        if triton is not None:
            triton.stop()
        redis.stop()


def test_the_bundle_keeps_the_csvs_string_ids_and_feature_vocabularies(own_stack: OwnStack) -> None:
    bundle = own_stack.bundle
    assert set(bundle.item_ids) == own_stack.csv_items and sorted(bundle.user_ids) == own_stack.csv_users
    assert bundle.manifest["dataset"] == "shop" and bundle.model_version.startswith("shop-v1-")
    features = bundle.manifest["features"]
    assert [c["name"] for c in features["user"]] == ["country", "age"]
    assert [(c["name"], c["kind"]) for c in features["item"]] == [("category", "categorical"), ("price", "numeric")]
    assert bundle.manifest["feature_sizes"]["item"][0] == ["category", 5]  # 4 categories + unknown
    vocabularies = json.loads((bundle.path / "feature_vocabularies.json").read_text())
    assert vocabularies["user"]["country"][0] == "" and set(vocabularies["user"]["country"][1:]) == {"DE", "FR", "US"}
    assert set(vocabularies["item"]["category"][1:]) == set(CATEGORIES) and "price" not in vocabularies["item"]


def test_precomputed_lists_hold_the_csvs_item_ids(own_stack: OwnStack) -> None:
    async def lists() -> list:
        backend = sharded_backend([own_stack.redis_url])
        try:
            store = RedisPrecomputedStore(backend, own_stack.bundle.model_version)
            return await store.get_recs(own_stack.csv_users[:5])
        finally:
            await backend.aclose()

    for recs in asyncio.run(lists()):
        assert recs is not None and recs.items
        assert set(recs.items) <= own_stack.csv_items


def test_a_served_answer_carries_string_item_ids_from_the_csv(own_stack: OwnStack) -> None:
    user = "cust-00007"
    response = httpx.get(
        f"{own_stack.app_url}/v1/recommendations/{user}", params={"n": 5, "page_type": "home"}, timeout=10
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"] == "realtime" and body["model_version"] == own_stack.bundle.model_version
    served = [item["item_id"] for item in body["items"]]
    assert len(served) == 5 and set(served) <= own_stack.csv_items
    assert all(item.startswith("sku-") for item in served)


def test_make_up_re_exports_the_bundles_trained_ranker_without_training(own_stack: OwnStack, tmp_path: Path) -> None:
    from export.pipeline import export_bundle

    # What `make up DATASET=shop` does when model_repository/ holds another data set's ranker.
    export_bundle(own_stack.bundle.path, tmp_path / "repo")
    for model, file in (("ranker_onnx", "model.onnx"), ("ranker_torchscript", "model.pt")):
        manifest = json.loads((tmp_path / "repo" / model / "1" / "manifest.json").read_text())
        assert (tmp_path / "repo" / model / "1" / file).is_file()
        assert manifest["model_version"] == own_stack.bundle.model_version
        assert max(report["max_abs_diff"] for report in manifest["parity"]) <= 1e-5
