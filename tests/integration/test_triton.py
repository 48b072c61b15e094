"""A real tritonserver (the nvidia-pytriton wheel's binary) serving the cpu profile."""

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from export.model_export import eager_scores, example_inputs
from export.model_repository import render_profile_repository
from export.pipeline import load_ranker
from export.triton_config import ModelSpec, ranker_models
from orchestrator.ranking.triton_ranker import infer_inputs
from stack.errors import TritonLaunchError
from stack.triton_launcher import TritonServer
from tests.conftest import Exported

pytestmark = pytest.mark.integration

OUTPUTS = {"ranker_onnx": "score", "ranker_torchscript": "score__0"}


def _inputs(module, tensors: dict[str, np.ndarray]) -> list:
    return infer_inputs(tensors, module.InferInput)


def test_both_models_load_ready(triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    assert client.is_server_ready()
    for model in OUTPUTS:
        assert client.is_model_ready(model, "1")


def test_one_user_requests_run_the_factored_graph_with_the_models_scores(
    triton: TritonServer, exported: Exported
) -> None:
    """A request of one user's candidates (as the orchestrator sends) runs model_factored.onnx; one whose rows hold
    another user too runs model.onnx. Both give every row the exported model's score."""
    assert "ranker_onnx: one-user requests run model_factored.onnx" in triton.log_path.read_text()
    ranker = load_ranker(exported.bundle_path)
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    n = 50
    tensors = example_inputs(exported.bundle.dim, n, seed=11)
    for name in ("user_embedding", "user_features", "context_features"):
        tensors[name] = np.repeat(tensors[name][:1], n, axis=0)
    mixed = {name: value.copy() for name, value in tensors.items()}
    mixed["user_embedding"][-1] = example_inputs(exported.bundle.dim, 1, seed=12)["user_embedding"][0]
    for rows in (tensors, mixed):
        result = grpc.infer(
            "ranker_onnx", _inputs(grpcclient, rows), outputs=[grpcclient.InferRequestedOutput("score")]
        )
        assert np.max(np.abs(result.as_numpy("score").reshape(-1) - eager_scores(ranker, rows))) <= 1e-5


@pytest.mark.parametrize("model", sorted(OUTPUTS))
def test_grpc_and_http_match_eager_torch(triton: TritonServer, exported: Exported, model: str) -> None:
    ranker = load_ranker(exported.bundle_path)
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    http = httpclient.InferenceServerClient(triton.http_url)
    for size in (1, 7, exported.batching.max_batch_size):
        tensors = example_inputs(exported.bundle.dim, size, seed=size)
        expected = eager_scores(ranker, tensors)
        output = OUTPUTS[model]
        via_grpc = grpc.infer(model, _inputs(grpcclient, tensors), outputs=[grpcclient.InferRequestedOutput(output)])
        via_http = http.infer(model, _inputs(httpclient, tensors), outputs=[httpclient.InferRequestedOutput(output)])
        for result in (via_grpc, via_http):
            got = result.as_numpy(output).reshape(-1)
            assert got.shape == expected.shape
            assert np.max(np.abs(got - expected)) <= 1e-5


async def test_dynamic_batching_merges_concurrent_requests(exported: Exported, tmp_path: Path) -> None:
    # Its own server with the queue policy off: on a loaded machine 48 simultaneous requests may wait
    # past the 40 ms queue timeout and be refused, which is that policy working (pinned by its own
    # tests), not the batcher failing. Here every request must run, so each one counts.
    batching = replace(exported.batching, queue_timeout_microseconds=0, max_queue_size=0)
    models = tuple(m for m in ranker_models(exported.bundle.dim, batching) if m.name == "ranker_onnx")
    repo = render_profile_repository("cpu", tmp_path / "cpu", exported.repo, models=models)
    server = TritonServer(repo, log_path=tmp_path / "log.txt")
    server.start()
    try:
        client = grpcaio.InferenceServerClient(server.grpc_url)
        model = "ranker_onnx"

        async def counts() -> tuple[int, int]:
            stats = await client.get_inference_statistics(model, "1", as_json=True)
            entry = stats["model_stats"][0]
            return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))

        before_inferences, before_executions = await counts()
        tensors = example_inputs(exported.bundle.dim, 4, seed=0)
        requests = [client.infer(model, _inputs(grpcaio, tensors)) for _ in range(48)]
        results = await asyncio.gather(*requests)
        after_inferences, after_executions = await counts()
        await client.close()
    finally:
        server.stop()
    assert all(r.as_numpy("score").shape == (4, 1) for r in results)
    inferences = after_inferences - before_inferences
    executions = after_executions - before_executions
    assert inferences == 48 * 4  # Triton counts rows (batch elements)
    # 48 requests in flight with a 5 ms queue delay: the batcher must have merged some of them.
    assert executions < 48


def test_wrong_shape_is_rejected_by_name(triton: TritonServer, exported: Exported) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    tensors = example_inputs(exported.bundle.dim, 2)
    tensors["user_embedding"] = tensors["user_embedding"][:, :5].copy()
    with pytest.raises(InferenceServerException, match=r"user_embedding.*\[-1,32\]|user_embedding.*shape"):
        client.infer("ranker_onnx", _inputs(grpcclient, tensors))


def test_wrong_dtype_is_rejected_by_name(triton: TritonServer, exported: Exported) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    tensors = example_inputs(exported.bundle.dim, 2)
    tensors["user_features"] = tensors["user_features"].astype(np.float32)
    with pytest.raises(InferenceServerException, match=r"user_features.*(TYPE_INT64|INT64)"):
        client.infer("ranker_onnx", _inputs(grpcclient, tensors))


def test_a_config_with_a_wrong_tensor_shape_fails_to_load_by_name(exported: Exported, tmp_path: Path) -> None:
    wrong = tuple(
        ModelSpec(m.name, m.runtime, m.filename, m.output_name, embedding_dim=64, batching=exported.batching)
        for m in ranker_models(32, exported.batching)
        if m.runtime == "onnxruntime"
    )
    repo = render_profile_repository("cpu", tmp_path / "cpu", exported.repo, models=wrong)
    with pytest.raises(TritonLaunchError, match=r"(?s)exited.*user_embedding.*expects TYPE_FP32 dims \[64\].*\[32\]"):
        TritonServer(repo, log_path=tmp_path / "log.txt", startup_timeout_s=60).start()


def test_missing_model_file_fails_the_launch_by_name(exported: Exported, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(exported.repo, source)
    models = ranker_models(32, exported.batching)
    repo = render_profile_repository("cpu", tmp_path / "cpu", source, models=models)
    (source / "ranker_onnx" / "1" / "model.onnx").unlink()  # the link now dangles
    with pytest.raises(TritonLaunchError, match=r"(?s)exited.*model file .*model.onnx does not exist"):
        TritonServer(repo, log_path=tmp_path / "log.txt", startup_timeout_s=60).start()


def test_admin_apis_are_closed_without_the_key(exported: Exported, tmp_path: Path) -> None:
    models = ranker_models(32, exported.batching)
    repo = render_profile_repository("cpu", tmp_path / "cpu", exported.repo, models=models)
    with TritonServer(repo, log_path=tmp_path / "log.txt", admin_key="s3cret") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        with pytest.raises(InferenceServerException, match=r"(?i)restricted|unauthori|forbidden|permission"):
            client.get_model_repository_index()
        index = client.get_model_repository_index(headers={"admin-key": "s3cret"})
        assert {m["name"] for m in index} == {"ranker_onnx", "ranker_torchscript"}
        with pytest.raises(InferenceServerException):
            client.unload_model("ranker_onnx", headers={"admin-key": "s3cret"})  # model control is off for all
        assert client.is_model_ready("ranker_onnx")  # inference stays open


@pytest.mark.parametrize("model", sorted(OUTPUTS))
async def test_the_service_ranker_serves_either_export_by_its_metadata(
    triton: TritonServer, exported: Exported, model: str
) -> None:
    """RECSERVE_TRITON_MODEL may name either model: the output tensor's name comes from Triton, not a constant."""
    from orchestrator.ranking import RankingRequest
    from orchestrator.ranking.triton_ranker import TritonRanker

    n = 7
    tensors = example_inputs(exported.bundle.dim, n, seed=3)
    request = RankingRequest(
        user_embedding=tensors["user_embedding"][0],
        user_features=tensors["user_features"][0],
        item_embeddings=tensors["item_embedding"],
        item_features=tensors["item_features"],
        context_features=tensors["context_features"][0],
    )
    ranker = TritonRanker(triton.grpc_url, model, exported.bundle.model_version)
    try:
        scores = await ranker.score(request, timeout_s=5.0)
    finally:
        await ranker.aclose()
    assert ranker.output == OUTPUTS[model]
    expected = eager_scores(load_ranker(exported.bundle_path), request.tensors())
    assert np.max(np.abs(scores - expected)) <= 1e-5
