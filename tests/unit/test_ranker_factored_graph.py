"""The one-user ONNX graph (export/ranker_factored.py) that the cpu profile's Triton model runs: the exported
ranker's scores, from one row of the user's inputs; a model of another architecture gets no graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from export.model_export import eager_scores, example_inputs, export_onnx
from export.models import Ranker
from export.ranker_factored import ONE_ROW_INPUTS, FactoredParityError, write_factored_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ranker, Path]:
    torch.manual_seed(7)
    ranker = Ranker(embedding_dim=32)
    ranker.eval()
    return ranker, export_onnx(ranker, tmp_path_factory.mktemp("ranker") / "model.onnx")


def one_user(tensors: dict[str, np.ndarray], row: int) -> dict[str, np.ndarray]:
    """``tensors`` with every per-user input set to row ``row``'s on every row, as the orchestrator sends them."""
    n = len(tensors["item_embedding"])
    return {k: np.repeat(v[row : row + 1], n, axis=0) if k in ONE_ROW_INPUTS else v for k, v in tensors.items()}


@pytest.mark.parametrize("n", [1, 7, 200])
def test_the_graph_scores_one_users_candidates_as_the_model_does(exported: tuple[Ranker, Path], tmp_path: Path, n: int):
    ranker, model_file = exported
    write_factored_model(model_file, tmp_path / "model_factored.onnx")
    factored = ort.InferenceSession(str(tmp_path / "model_factored.onnx"), providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    for row in range(3):
        tensors = one_user(example_inputs(32, n, seed=row), row % n)
        tensors["item_features"][0] = 10_000  # past every vocabulary: both clamp it
        one_row = {k: v[:1] if k in ONE_ROW_INPUTS else v for k, v in tensors.items()}
        got = factored.run(None, one_row)[0]
        assert got.shape == (n, 1)
        np.testing.assert_allclose(got.reshape(-1), full.run(None, tensors)[0].reshape(-1), atol=1e-6)
        np.testing.assert_allclose(got.reshape(-1), eager_scores(ranker, tensors), atol=1e-5)


def test_a_model_of_another_architecture_gets_no_graph(tmp_path: Path):
    inputs = [helper.make_tensor_value_info("item_embedding", TensorProto.FLOAT, [None, 4])]
    ones = onnx.numpy_helper.from_array(np.ones((4, 1), np.float32), "ones")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["item_embedding", "ones"], ["score"])],
        "sum",
        inputs,
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [ones],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(FactoredParityError, match=r"not export\.models\.Ranker"):
        write_factored_model(tmp_path / "model.onnx", tmp_path / "model_factored.onnx")
    assert not (tmp_path / "model_factored.onnx").exists()
