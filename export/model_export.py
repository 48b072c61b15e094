"""Export the ranker to ONNX and TorchScript and prove both match eager torch.

The tensor names, dtypes and the dynamic batch axis come from ``orchestrator.schema.ranker_inputs``:
the same contract the Triton configs and the online encoder use.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.errors import ParityError
from export.models import Ranker
from orchestrator import schema

log = logging.getLogger(__name__)

ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-5


def example_inputs(embedding_dim: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random but valid ranker inputs: unit-norm embeddings, in-vocabulary categorical indices."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    vocabularies = {
        "user_features": schema.USER_FEATURES,
        "item_features": schema.ITEM_FEATURES,
        "context_features": schema.CONTEXT_FEATURES,
    }
    for spec in schema.ranker_inputs(embedding_dim):
        if spec.dtype == "float32":
            x = rng.normal(size=(batch_size, spec.width)).astype(np.float32)
            tensors[spec.name] = x / np.linalg.norm(x, axis=1, keepdims=True)
        else:
            sizes = [size for _, size in vocabularies[spec.name]]
            tensors[spec.name] = np.stack([rng.integers(0, s, batch_size) for s in sizes], axis=1)
    return tensors


def _torch_inputs(tensors: dict[str, np.ndarray], embedding_dim: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(tensors[spec.name]) for spec in schema.ranker_inputs(embedding_dim))


def eager_scores(ranker: Ranker, tensors: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = ranker(*_torch_inputs(tensors, ranker.embedding_dim))
    return out.numpy().reshape(-1)


def export_onnx(ranker: Ranker, path: Path) -> Path:
    """TorchScript-based exporter (dynamo=False): no onnxscript dependency, stable graphs for TensorRT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = schema.ranker_inputs(ranker.embedding_dim)
    dummy = _torch_inputs(example_inputs(ranker.embedding_dim, 4), ranker.embedding_dim)
    dynamic_axes = {spec.name: {0: "batch"} for spec in specs} | {schema.RANKER_OUTPUT.name: {0: "batch"}}
    ranker.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation on every call
        torch.onnx.export(
            ranker,
            dummy,
            str(path),
            input_names=[spec.name for spec in specs],
            output_names=[schema.RANKER_OUTPUT.name],
            dynamic_axes=dynamic_axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    return path


def export_torchscript(ranker: Ranker, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ranker.eval()
    # Tracing, not scripting: forward() has no data-dependent control flow, and the parity check on
    # batch sizes 1, 7 and the max proves the traced graph generalises over the batch axis.
    example = _torch_inputs(example_inputs(ranker.embedding_dim, 4), ranker.embedding_dim)
    # TorchScript is deprecated upstream, but Triton's LibTorch backend still serves exactly this.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(ranker, example, check_trace=False)
    traced.save(str(path))
    return path


@dataclass(frozen=True)
class ParityReport:
    backend: str
    batch_size: int
    source: str  # "random" or "real"
    max_abs_diff: float


def check_parity(
    backend: str,
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    ranker: Ranker,
    batches: dict[str, list[dict[str, np.ndarray]]],
    tolerance: float = PARITY_TOLERANCE,
) -> list[ParityReport]:
    """Compare ``run`` with eager torch on every batch; raise ParityError past ``tolerance``."""
    reports = []
    for source, tensor_batches in batches.items():
        for tensors in tensor_batches:
            expected = eager_scores(ranker, tensors)
            got = np.asarray(run(tensors), dtype=np.float32).reshape(-1)
            if got.shape != expected.shape:
                raise ParityError(backend, len(expected), float("inf"), tolerance)
            diff = float(np.max(np.abs(got - expected)))
            batch_size = len(expected)
            reports.append(ParityReport(backend, batch_size, source, diff))
            if diff > tolerance:
                raise ParityError(backend, batch_size, diff, tolerance)
    return reports


def onnx_runner(path: Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda tensors: session.run([schema.RANKER_OUTPUT.name], tensors)[0]


def torchscript_runner(path: Path, embedding_dim: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path))

    def run(tensors: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return module(*_torch_inputs(tensors, embedding_dim)).numpy()

    return run
