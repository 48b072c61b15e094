"""The pre-compute job over MovieLens 100K: a list for every user, equal to what the model ranks for
that user alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.precompute import synthetic_bundle
from export.artifacts import Bundle, load_bundle
from export.data import load_movielens, movielens_dir, temporal_split
from export.faiss_index import build_index
from export.history import UserHistory
from export.model_export import export_onnx
from export.pipeline import popular_lists
from export.precompute import (
    BackendSpec,
    Candidates,
    PrecomputeConfig,
    PrecomputeWorkerError,
    offline_top_n,
    precompute,
    precompute_processes,
)
from export.ranker_bf16 import BF16_TOLERANCE
from export.train import TrainConfig, train
from orchestrator.ranking.onnx_ranker import OnnxRanker
from orchestrator.retrieval import FaissRetriever
from orchestrator.store.precomputed import RedisPrecomputedStore
from orchestrator.store.sharded import ShardedBackend
from tests.bundles import reference_scores
from tests.redis_harness import RedisServer

pytestmark = pytest.mark.integration
# Quality does not matter here, only that job and reference agree: train as little as possible.
TINY = TrainConfig(
    embedding_dim=16,
    retrieval_epochs=1,
    ranker_epochs=1,
    retrieval_batch_size=2048,
    ranker_batch_size=4096,
    negatives_per_positive=1,
)


@pytest.fixture(scope="module")
def movielens_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bundle, Path]]:
    folder = movielens_dir()
    if not (folder / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {folder} (set RECSERVE_MOVIELENS_DIR)")
    path = tmp_path_factory.mktemp("movielens-bundle")
    data = load_movielens(folder)
    models = train(data, temporal_split(data), TINY)
    history = UserHistory.from_rows(data.user_ids, data.item_ids, data.user_idx, data.item_idx)
    version = "ml100k-test"
    bundle = Bundle(
        path, {"model_version": version, "embedding_dim": TINY.embedding_dim}, data.user_ids, data.item_ids,
        models.user_embeddings, models.item_embeddings, models.user_features, models.item_features,
        history, popular_lists(data),
    )  # fmt: skip
    export_onnx(models.ranker, path / "ranker.onnx")
    build_index(models.item_embeddings, data.item_ids, version, path / "item_index.faiss")
    yield bundle, path


class Crash(Exception):
    pass


@pytest.mark.movielens
async def test_precompute_writes_every_users_offline_list(sharded: ShardedBackend, movielens_bundle):
    bundle, path = movielens_bundle
    retriever = FaissRetriever(path / "item_index.faiss")
    ranker = OnnxRanker(path / "ranker.onnx", bundle.model_version, intra_op_threads=2)

    def crash(done: int) -> None:
        if done >= 256:
            raise Crash

    # Two pods of an Indexed Job; pod 0 dies after its first batch and is restarted.
    reports = []
    for index in (0, 1):
        cfg = PrecomputeConfig(batch_users=128, shard_index=index, shard_count=2, ttl_s=3600)
        if index == 0:
            with pytest.raises(Crash):
                await precompute(sharded, bundle, retriever, ranker, cfg, progress=False, on_batch=crash)
        reports.append(await precompute(sharded, bundle, retriever, ranker, cfg, progress=False))
    assert reports[0].skipped_users == 256 and reports[1].skipped_users == 0
    assert sum(r.users for r in reports) == len(bundle.user_ids) == 943

    stored = await RedisPrecomputedStore(sharded, "ml100k-test").get_recs(bundle.user_ids)
    reference = Candidates(bundle, retriever, PrecomputeConfig())
    for row, recs in enumerate(stored):
        assert recs is not None, f"no list for user {bundle.user_ids[row]}"
        items, scores = offline_top_n(reference, row, ranker.run)
        assert list(recs.items) == items
        np.testing.assert_allclose(recs.scores, scores, rtol=1e-5, atol=1e-6)
        assert recs.model_version == "ml100k-test" and len(items) == 50
        assert not set(items) & set(bundle.user_history[bundle.user_ids[row]])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, Path]:
    path = tmp_path_factory.mktemp("precompute-synthetic")
    synthetic_bundle(path, 301, 1_500, dim=16, mean_history=30, min_history=1)
    return load_bundle(path), path


async def test_processes_of_a_pod_write_every_users_list_once_and_resume(
    sharded: ShardedBackend, shard_servers: list[RedisServer], synthetic
):
    bundle, path = synthetic
    urls = [s.url for s in shard_servers]
    cfg = PrecomputeConfig(top_n=20, n_candidates=80, batch_users=40, ttl_s=3600, shard_index=1, shard_count=2)
    args = (path, path / "item_index.faiss", path / "ranker.onnx", cfg, 2)
    report = await precompute_processes(urls, *args, progress=False)
    pod_rows = list(range(1, 301, 2))
    assert (report.users, report.skipped_users, report.processes) == (150, 0, 2)
    # Process w of 2 in pod 1 of 2 takes rows r % 4 == 1 + 2w: 75 users each, no user twice.
    assert [(r.shard, r.users) for r in report.per_process] == [("1of4", 75), ("3of4", 75)]
    assert report.cpu_seconds > 0

    stored = await RedisPrecomputedStore(sharded, bundle.model_version).get_recs(bundle.user_ids)
    assert [row for row, recs in enumerate(stored) if recs is not None] == pod_rows  # the other pod's: none
    ranker = OnnxRanker(path / "ranker.onnx", bundle.model_version)
    reference = Candidates(bundle, FaissRetriever(path / "item_index.faiss"), cfg)
    for row in pod_rows:
        recs = stored[row]
        assert recs is not None
        items, scores = offline_top_n(reference, row, ranker.run)
        assert list(recs.items) == items
        np.testing.assert_allclose(recs.scores, scores, rtol=1e-5, atol=1e-6)

    again = await precompute_processes(urls, *args, progress=False)
    assert (again.users, again.skipped_users) == (150, 150)  # each process resumed past its checkpoint


async def test_processes_rank_in_bf16_when_asked(sharded: ShardedBackend, shard_servers: list[RedisServer], synthetic):
    bundle, path = synthetic
    urls = [s.url for s in shard_servers]
    cfg = PrecomputeConfig(top_n=20, n_candidates=80, batch_users=40, ttl_s=3600, ranker="bf16")
    report = await precompute_processes(
        BackendSpec(tuple(urls)), path, path / "item_index.faiss", path / "ranker.onnx", cfg, 2, progress=False
    )
    assert (report.users, report.skipped_users) == (301, 0)
    stored = await RedisPrecomputedStore(sharded, bundle.model_version).get_recs(bundle.user_ids)
    assert all(recs is not None for recs in stored)
    ranker = OnnxRanker(path / "ranker.onnx", bundle.model_version)
    reference = Candidates(bundle, FaissRetriever(path / "item_index.faiss"), cfg)
    diffs = []
    for row, recs in enumerate(stored):
        assert recs is not None and len(recs.items) == cfg.top_n
        fp32 = reference_scores(reference, row, ranker.run)
        diffs += [abs(score - fp32[item]) for item, score in zip(recs.items, recs.scores, strict=True)]
    assert 1e-6 < max(diffs) <= BF16_TOLERANCE  # bf16's rounding, not fp32's (~1e-7), and within its bound


async def test_a_failing_process_fails_the_pod_with_its_reason(shard_servers: list[RedisServer], synthetic, tmp_path):
    _, path = synthetic
    cfg = PrecomputeConfig(top_n=20, n_candidates=80, ttl_s=3600)
    with pytest.raises(PrecomputeWorkerError, match=r"expected every pre-compute process.*found 2.*missing\.onnx"):
        await precompute_processes(
            [shard_servers[0].url], path, path / "item_index.faiss", tmp_path / "missing.onnx", cfg, 2, progress=False
        )
