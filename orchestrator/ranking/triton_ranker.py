"""Ranking on Triton over gRPC (``tritonclient`` aio), within what is left of the request deadline.

The budget travels with the call: Triton gets it as the request's ``timeout`` (a request still queued in
the dynamic batcher past it is rejected, not run for nobody) and, plus a grace, as the gRPC deadline.

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

from orchestrator import metrics, telemetry
from orchestrator.ranking import RankerUnavailable, RankingRequest, check_scores
from orchestrator.ranking.breaker import CircuitBreaker
from orchestrator.readiness import Readiness

TRITON_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
# What Triton's scheduler answers for a request that waited in its queue past the request's timeout
# (triton-inference-server/core, dynamic_batch_scheduler.cc): the budget ran out, the server is not failing.
QUEUE_TIMEOUT_MESSAGE = "Request timeout expired"
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
        output: str | None = None,
        max_connection_age_s: float = 300.0,
        breaker: CircuitBreaker | None = None,
        max_outstanding: int = 128,
        call_timeout_s: float = 5.0,
        call_grace_s: float = 0.5,
        triton_version: int | None = None,
    ) -> None:
        self.url = url
        self.model = model
        self.model_version = model_version
        # The Triton version number of ``model`` that ranks (several are served side by side while a new
        # model version is published); None: whichever Triton's version policy picks.
        self.triton_version = "" if triton_version is None else str(triton_version)
        # The output tensor's name differs by export (ONNX: score, TorchScript: score__0): taken from the
        # model's metadata on first use unless given.
        self.output = output
        self.max_connection_age_s = max_connection_age_s
        self.breaker = breaker or CircuitBreaker(failures=5, reset_s=2.0)
        self._client: grpcaio.InferenceServerClient | None = None
        self._client_born = 0.0
        self._retired: set[asyncio.Task[None]] = set()
        self.max_outstanding = max_outstanding
        self.call_timeout_s = call_timeout_s  # the budget of a call given none (and the most any call gets)
        self.call_grace_s = call_grace_s
        self._outstanding: set[asyncio.Future[np.ndarray]] = set()

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
        budget_s = self.call_timeout_s if timeout_s is None else min(timeout_s, self.call_timeout_s)
        call = asyncio.ensure_future(self._infer(infer_inputs(request.tensors(), grpcaio.InferInput), budget_s))
        self._outstanding.add(call)
        call.add_done_callback(self._settle)
        try:
            # Stop waiting at the deadline but do not cancel the gRPC call then: Triton 2.51 can crash on a
            # request cancelled while it completes (server#7368, fixed in r24.12). The call finishes in the
            # background, bounded in number by max_outstanding and in time by its gRPC deadline (_infer).
            result = await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except TimeoutError as exc:
            if call.done():
                raise  # the call's own outcome: Triton's queue rejected it for want of time (_infer)
            metrics.RANKER_ERRORS.inc()
            # The budget ran out (reason deadline): Triton is not down for it, nor is the circuit any nearer open.
            raise TimeoutError(f"Triton at {self.url}: no answer within {timeout_s:.3f} s") from exc
        return check_scores(result, request.n_candidates, "triton")

    async def _output_name(self, timeout_s: float) -> str:
        """The model's one output, from Triton's model metadata (read once)."""
        if self.output is None:
            metadata = await self._current_client().get_model_metadata(
                self.model, model_version=self.triton_version, as_json=True, client_timeout=timeout_s
            )
            outputs = [o["name"] for o in metadata.get("outputs", [])]
            if len(outputs) != 1:
                raise RankerUnavailable(
                    f"Triton model {self.model!r}: expected one output tensor (the scores), but found {outputs}"
                )
            self.output = outputs[0]
        return self.output

    def _settle(self, call: asyncio.Future[np.ndarray]) -> None:
        self._outstanding.discard(call)
        if not call.cancelled():
            call.exception()  # retrieved: a caller that stopped waiting must not leave a warning behind

    async def _infer(self, inputs: list[grpcaio.InferInput], budget_s: float) -> np.ndarray:
        """One call within ``budget_s``; its outcome (not the caller's patience) feeds the circuit breaker."""
        try:
            output = await self._output_name(budget_s)
            with telemetry.span("triton.infer", {"triton.model": self.model}):
                result = await self._current_client().infer(
                    self.model,
                    inputs,
                    model_version=self.triton_version,
                    outputs=[grpcaio.InferRequestedOutput(output)],
                    # Microseconds; 0 would mean none. Honoured where the model's queue policy allows overrides
                    # (allow_timeout_override, and only below its default_timeout_microseconds); else ignored.
                    timeout=max(1, int(budget_s * 1e6)),
                    # The budget plus a grace, so that a call is cancelled only when it runs well past the moment
                    # its caller stopped waiting (see score), never as its answer arrives at the deadline.
                    client_timeout=budget_s + self.call_grace_s,
                )
        except InferenceServerException as exc:
            if QUEUE_TIMEOUT_MESSAGE in str(exc):
                # Rejected by its queue for want of time: the server is up and answering (a half-open
                # circuit's probe closes on it), the budget was too short for its queue.
                self.breaker.record_success()
                metrics.RANKER_ERRORS.inc()
                raise TimeoutError(f"Triton at {self.url}: queued past the budget of {budget_s:.3f} s") from exc
            self.breaker.record_failure()
            metrics.RANKER_ERRORS.inc()
            raise RankerUnavailable(f"Triton at {self.url}: {exc}") from exc
        except (TimeoutError, OSError) as exc:
            self.breaker.record_failure()
            metrics.RANKER_ERRORS.inc()
            raise RankerUnavailable(f"Triton at {self.url}: {exc}") from exc
        self.breaker.record_success()
        return result.as_numpy(output)

    async def ready(self, timeout_s: float = 0.5) -> Readiness:
        try:
            async with asyncio.timeout(timeout_s):
                if await self._current_client().is_model_ready(self.model, model_version=self.triton_version):
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
