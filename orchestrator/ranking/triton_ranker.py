"""Ranking on Triton over gRPC (``tritonclient`` aio), within what is left of the request deadline.

Balancing: with ``dns:///triton-headless:8001`` the gRPC channel resolves every Triton pod and spreads
calls round robin; re-creating the channel every ``max_connection_age_s`` re-resolves DNS, so pods
added by the autoscaler get traffic instead of idling behind long-lived connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from orchestrator import metrics
from orchestrator.ranking import RankerUnavailable, RankingRequest, check_scores
from orchestrator.ranking.breaker import CircuitBreaker
from orchestrator.readiness import Readiness

TRITON_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
InputT = TypeVar("InputT")


def infer_inputs(tensors: dict[str, np.ndarray], input_class: Callable[[str, list[int], str], InputT]) -> list[InputT]:
    """Named numpy tensors as Triton inputs; ``input_class`` is the InferInput of the client flavour
    (grpc, grpc.aio or http)."""
    inputs = []
    for name, value in tensors.items():
        tensor = input_class(name, list(value.shape), TRITON_DTYPES[value.dtype])
        tensor.set_data_from_numpy(value)  # type: ignore[attr-defined]
        inputs.append(tensor)
    return inputs


def channel_args(url: str) -> list[tuple[str, object]]:
    args: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
        # gRPC's default reconnect backoff grows to 120 s: a Triton that restarted would sit unused for
        # minutes. Retry the connection at least every second; the circuit breaker already keeps calls
        # off a dead server, so frequent reconnect attempts cost nothing on the request path.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if url.startswith("dns:"):
        args.append(("grpc.lb_policy_name", "round_robin"))
    return args


class TritonRanker:
    def __init__(
        self,
        url: str,
        model: str,
        model_version: str,
        output: str = "score",
        max_connection_age_s: float = 300.0,
        breaker: CircuitBreaker | None = None,
        max_outstanding: int = 128,
        call_timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.model = model
        self.model_version = model_version
        self.output = output
        self.max_connection_age_s = max_connection_age_s
        self.breaker = breaker or CircuitBreaker(failures=5, reset_s=2.0)
        self._client: grpcaio.InferenceServerClient | None = None
        self._client_born = 0.0
        self._retired: set[asyncio.Task[None]] = set()
        self.max_outstanding = max_outstanding
        self.call_timeout_s = call_timeout_s
        self._outstanding: set[asyncio.Future[grpcaio.InferResult]] = set()

    def _current_client(self) -> grpcaio.InferenceServerClient:
        now = time.monotonic()
        if self._client is None or now - self._client_born > self.max_connection_age_s:
            old = self._client
            self._client = grpcaio.InferenceServerClient(self.url, channel_args=channel_args(self.url))
            self._client_born = now
            if old is not None:
                # Let calls in flight on the old channel finish before closing it.
                task = asyncio.ensure_future(self._close_later(old))
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)
        return self._client

    @staticmethod
    async def _close_later(client: grpcaio.InferenceServerClient, grace_s: float = 5.0) -> None:
        await asyncio.sleep(grace_s)
        await client.close()

    async def score(self, request: RankingRequest, timeout_s: float | None = None) -> np.ndarray:
        if not self.breaker.allow():
            raise RankerUnavailable(f"Triton at {self.url}: circuit open after repeated failures")
        if len(self._outstanding) >= self.max_outstanding:
            metrics.RANKER_ERRORS.inc()
            raise RankerUnavailable(f"Triton at {self.url}: {len(self._outstanding)} calls already in flight")
        call = asyncio.ensure_future(self._infer(infer_inputs(request.tensors(), grpcaio.InferInput)))
        self._outstanding.add(call)
        call.add_done_callback(self._settle)
        try:
            # Stop waiting at the deadline but never cancel the gRPC call: Triton 2.51 can crash on a
            # request cancelled while it completes (server#7368, fixed in r24.12). The call finishes in
            # the background, bounded in number by max_outstanding and in time by call_timeout_s.
            result = await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except TimeoutError as exc:
            metrics.RANKER_ERRORS.inc()
            raise RankerUnavailable(f"Triton at {self.url}: no answer within {timeout_s:.3f} s") from exc
        return check_scores(result.as_numpy(self.output), request.n_candidates, "triton")

    def _settle(self, call: asyncio.Future[grpcaio.InferResult]) -> None:
        self._outstanding.discard(call)
        if not call.cancelled():
            call.exception()  # retrieved: a caller that stopped waiting must not leave a warning behind

    async def _infer(self, inputs: list[grpcaio.InferInput]) -> grpcaio.InferResult:
        """One call; its outcome (not the caller's patience) feeds the circuit breaker."""
        try:
            result = await self._current_client().infer(
                self.model,
                inputs,
                outputs=[grpcaio.InferRequestedOutput(self.output)],
                client_timeout=self.call_timeout_s,
            )
        except (TimeoutError, InferenceServerException, OSError) as exc:
            self.breaker.record_failure()
            metrics.RANKER_ERRORS.inc()
            raise RankerUnavailable(f"Triton at {self.url}: {exc}") from exc
        self.breaker.record_success()
        return result

    async def ready(self, timeout_s: float = 0.5) -> Readiness:
        try:
            async with asyncio.timeout(timeout_s):
                if await self._current_client().is_model_ready(self.model):
                    return Readiness(True, "ok (triton)")
        except (InferenceServerException, OSError, TimeoutError):
            pass
        return Readiness(False, f"unreachable (triton, circuit {self.breaker.state})")

    async def aclose(self) -> None:
        if self._outstanding:  # let calls in flight finish rather than cancel them (see score)
            await asyncio.wait(list(self._outstanding), timeout=self.call_timeout_s)
        for task in list(self._retired):
            task.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
