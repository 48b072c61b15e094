"""In-process ONNX Runtime ranker: the embedded default when no Triton address is configured, and the
reference the Triton path is checked against."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort

from orchestrator import telemetry
from orchestrator.ranking import RankingRequest, check_scores
from orchestrator.readiness import Readiness


class OnnxRanker:
    def __init__(self, model_path: Path, model_version: str, intra_op_threads: int = 1) -> None:
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"ranker model {model_path} does not exist; run `python -m export all`")
        options = ort.SessionOptions()
        # One thread per session: the service runs many requests concurrently, so intra-op threads
        # would only fight each other for the same cores.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.model_version = model_version

    def run(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """Synchronous batch scoring of named input tensors (for offline jobs and benchmarks)."""
        (scores,) = self._session.run(["score"], tensors)
        return np.asarray(scores, dtype=np.float32).reshape(-1)

    async def score(self, request: RankingRequest, timeout_s: float | None = None) -> np.ndarray:
        # ONNX Runtime releases the GIL, so a worker thread keeps the event loop free.
        try:
            async with asyncio.timeout(timeout_s):
                with telemetry.span("onnxruntime.run"):
                    scores = await asyncio.to_thread(self.run, request.tensors())
        except TimeoutError as exc:
            raise TimeoutError(f"onnxruntime did not answer within {timeout_s:.3f} s") from exc
        return check_scores(scores, request.n_candidates, "onnxruntime")

    async def ready(self) -> Readiness:
        return Readiness(True, "ok (in-process onnxruntime)")  # loaded in the constructor, or it raised

    async def aclose(self) -> None:
        """Nothing to release: the session goes with the object."""
