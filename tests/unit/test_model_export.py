from pathlib import Path

import numpy as np
import pytest

from export.errors import ParityError
from export.model_export import (
    check_parity,
    eager_scores,
    example_inputs,
    export_onnx,
    export_torchscript,
    onnx_runner,
    torchscript_runner,
)
from export.models import Ranker
from orchestrator.ranking import RankingRequest
from orchestrator.ranking.onnx_ranker import OnnxRanker


@pytest.fixture(scope="module")
def ranker() -> Ranker:
    import torch

    torch.manual_seed(0)
    return Ranker(embedding_dim=16).eval()


@pytest.fixture(scope="module")
def onnx_path(ranker: Ranker, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(ranker, tmp_path_factory.mktemp("onnx") / "model.onnx")


BATCHES = {"random": [example_inputs(16, n, seed=n) for n in (1, 7, 300)]}


def test_onnx_matches_eager_torch(ranker: Ranker, onnx_path: Path) -> None:
    reports = check_parity("onnx", onnx_runner(onnx_path), ranker, BATCHES)
    assert [r.batch_size for r in reports] == [1, 7, 300]
    assert max(r.max_abs_diff for r in reports) <= 1e-5


def test_onnx_has_named_inputs_and_a_dynamic_batch_axis(onnx_path: Path) -> None:
    import onnx

    model = onnx.load(str(onnx_path))
    assert [i.name for i in model.graph.input] == [
        "user_embedding",
        "item_embedding",
        "user_features",
        "item_features",
        "context_features",
    ]
    assert [o.name for o in model.graph.output] == ["score"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17


def test_torchscript_matches_eager_torch(ranker: Ranker, tmp_path: Path) -> None:
    path = export_torchscript(ranker, tmp_path / "model.pt")
    reports = check_parity("torchscript", torchscript_runner(path, 16), ranker, BATCHES)
    assert max(r.max_abs_diff for r in reports) <= 1e-5


def test_a_drifting_export_fails_and_says_by_how_much(ranker: Ranker, onnx_path: Path) -> None:
    run = onnx_runner(onnx_path)
    with pytest.raises(ParityError, match=r"at batch size 1: max abs diff 0.001 > tolerance 1e-05"):
        check_parity("onnx", lambda t: run(t) + 1e-3, ranker, BATCHES)


async def test_in_process_onnx_ranker_scores_one_user(ranker: Ranker, onnx_path: Path) -> None:
    tensors = example_inputs(16, 5, seed=3)
    request = RankingRequest(
        user_embedding=tensors["user_embedding"][0],
        user_features=tensors["user_features"][0],
        item_embeddings=tensors["item_embedding"],
        item_features=tensors["item_features"],
        context_features=tensors["context_features"][0],
    )
    scores = await OnnxRanker(onnx_path, "v1").score(request)
    assert scores.shape == (5,)
    np.testing.assert_allclose(scores, eager_scores(ranker, request.tensors()), atol=1e-5)


def test_scores_are_probabilities(ranker: Ranker) -> None:
    scores = eager_scores(ranker, example_inputs(16, 64))
    assert ((scores > 0) & (scores < 1)).all()
