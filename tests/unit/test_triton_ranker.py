"""The Triton ranker carries the caller's budget to Triton and tells a budget that ran out from a Triton that
is down (orchestrator/ranking/triton_ranker.py), over a fake client in place of the gRPC one."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from orchestrator import schema
from orchestrator.ranking import RankerUnavailable, RankingRequest
from orchestrator.ranking.breaker import CircuitBreaker
from orchestrator.ranking.triton_ranker import TritonRanker

N, DIM = 3, 4


class FakeResult:
    def as_numpy(self, name: str) -> np.ndarray:
        return np.arange(N, dtype=np.float32)


class FakeClient:
    """Records every call's keyword arguments; answers, fails with ``error``, or waits on ``gate``."""

    def __init__(
        self, error: Exception | None = None, gate: asyncio.Event | None = None, outputs: tuple[str, ...] = ("score",)
    ) -> None:
        self.error = error
        self.gate = gate
        self.outputs = outputs
        self.calls: list[dict[str, Any]] = []
        self.metadata_reads = 0

    async def get_model_metadata(self, model: str, **options: Any) -> dict[str, Any]:
        self.metadata_reads += 1
        return {"name": model, "outputs": [{"name": name, "datatype": "FP32"} for name in self.outputs]}

    async def infer(self, model: str, inputs: list[Any], **options: Any) -> FakeResult:
        self.calls.append(options)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return FakeResult()


class RankerOver(TritonRanker):
    def __init__(self, client: FakeClient) -> None:
        super().__init__("triton:8001", "ranker_onnx", "v1", breaker=CircuitBreaker(failures=1, reset_s=60))
        self.fake = client

    def _current_client(self) -> Any:
        return self.fake


def request() -> RankingRequest:
    return RankingRequest(
        user_embedding=np.zeros(DIM, np.float32),
        user_features=np.zeros(len(schema.USER_FEATURES), np.int64),
        item_embeddings=np.zeros((N, DIM), np.float32),
        item_features=np.zeros((N, len(schema.ITEM_FEATURES)), np.int64),
        context_features=np.zeros(len(schema.CONTEXT_FEATURES), np.int64),
    )


async def test_the_remaining_budget_goes_to_triton_as_the_queue_timeout_and_with_a_grace_as_the_grpc_deadline() -> None:
    client = FakeClient()
    ranker = RankerOver(client)
    assert list(await ranker.score(request(), timeout_s=0.030)) == [0.0, 1.0, 2.0]
    (options,) = client.calls
    assert options["timeout"] == 30_000  # microseconds
    assert options["client_timeout"] == pytest.approx(0.030 + ranker.call_grace_s)


async def test_a_request_triton_queued_past_its_budget_is_a_deadline_not_a_triton_failure() -> None:
    ranker = RankerOver(FakeClient(error=InferenceServerException("Request timeout expired", "StatusCode.UNAVAILABLE")))
    with pytest.raises(TimeoutError, match=r"queued past the budget of 0\.030 s"):
        await ranker.score(request(), timeout_s=0.030)
    assert ranker.breaker.state == "closed"  # one real failure would have opened it (failures=1)


async def test_a_caller_out_of_time_stops_waiting_with_a_timeout_and_the_call_finishes_on_its_own() -> None:
    gate = asyncio.Event()
    ranker = RankerOver(FakeClient(gate=gate))
    with pytest.raises(TimeoutError, match=r"no answer within 0\.001 s"):
        await ranker.score(request(), timeout_s=0.001)
    assert len(ranker._outstanding) == 1  # not cancelled: Triton 2.51 may crash on a cancel as it answers
    gate.set()
    await asyncio.wait(list(ranker._outstanding), timeout=5)
    assert ranker.breaker.state == "closed"


async def test_a_triton_that_fails_is_unavailable_and_opens_the_circuit() -> None:
    ranker = RankerOver(FakeClient(error=InferenceServerException("connection refused", "StatusCode.UNAVAILABLE")))
    with pytest.raises(RankerUnavailable, match="connection refused"):
        await ranker.score(request(), timeout_s=0.030)
    assert ranker.breaker.state == "open"


async def test_the_output_name_comes_from_the_models_metadata_once() -> None:
    client = FakeClient(outputs=("score__0",))
    ranker = RankerOver(client)
    await ranker.score(request(), timeout_s=0.030)
    await ranker.score(request(), timeout_s=0.030)
    assert ranker.output == "score__0" and client.metadata_reads == 1
    assert [c["outputs"][0].name() for c in client.calls] == ["score__0", "score__0"]


async def test_a_model_without_exactly_one_output_is_refused_by_name() -> None:
    ranker = RankerOver(FakeClient(outputs=("score", "logits")))
    with pytest.raises(RankerUnavailable, match=r"expected one output tensor .* but found \['score', 'logits'\]"):
        await ranker.score(request(), timeout_s=0.030)
