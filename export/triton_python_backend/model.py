"""Triton Python-backend model for the ``cpu`` profile: serves the same ``model.onnx`` / ``model.pt`` that
the ``gpu-t4`` profile serves natively, with ONNX Runtime or TorchScript inside.

Copied into each cpu-profile version folder by ``export.model_repository``; it runs inside Triton's
Python stub, never imported by the project itself. The config's ``parameters`` choose the runtime:
``runtime`` (onnxruntime | torchscript), ``model_file``, ``intra_op_threads``.

With ONNX Runtime, a request whose rows are all one user's (the orchestrator sends one user's candidates
per request) runs ``model_factored.onnx`` when the version folder has it: the same scores with the
user's part of every product computed once (export/ranker_factored.py; about half the CPU of model.onnx
for 200 candidates, in process). It is checked against ``model.onnx`` when the model loads; a file that disagrees
is not used. A batch the dynamic batcher merged runs it request by request; a batch holding a request
of several users runs ``model.onnx`` whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

_NUMPY_DTYPES = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}
_ONNX_DTYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}
FACTORED_FILE = "model_factored.onnx"  # export.ranker_factored.FACTORED_FILE
ONE_ROW_INPUTS = ("user_embedding", "user_features", "context_features")  # the same rows throughout a request
FACTORED_TOLERANCE = 1e-5


def _parameter(config: dict[str, Any], name: str, default: str) -> str:
    return str(config.get("parameters", {}).get(name, {}).get("string_value", default))


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        self.inputs = [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]]
        self.output = config["output"][0]["name"]
        self.runtime = _parameter(config, "runtime", "onnxruntime")
        threads = int(_parameter(config, "intra_op_threads", "1"))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        model_file = version_dir / _parameter(config, "model_file", "model.onnx")
        if not model_file.exists():
            raise pb_utils.TritonModelException(
                f"{self.model_name}: model file {model_file} does not exist; run `python -m export all`"
            )
        self.factored: Any = None
        if self.runtime == "onnxruntime":
            self._load_onnx(model_file, threads)
            if (version_dir / FACTORED_FILE).exists():
                self._load_factored(version_dir / FACTORED_FILE, threads)
        elif self.runtime == "torchscript":
            self._load_torchscript(model_file, threads)
        else:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: parameter runtime must be onnxruntime or torchscript, got {self.runtime!r}"
            )

    def _load_onnx(self, model_file: Path, threads: int) -> None:
        self.session = _ort_session(model_file, threads)
        # The config must describe the file: a wrong name, dtype or width fails here, by name.
        model_inputs = {i.name: (i.type, list(i.shape)) for i in self.session.get_inputs()}
        for name, dtype, dims in self.inputs:
            if name not in model_inputs:
                raise pb_utils.TritonModelException(
                    f"{self.model_name}: config input {name!r} is not an input of {model_file.name} "
                    f"(the model has {sorted(model_inputs)})"
                )
            onnx_type, shape = model_inputs[name]
            if _ONNX_DTYPES.get(onnx_type) != dtype or shape[1:] != dims:
                raise pb_utils.TritonModelException(
                    f"{self.model_name}: config input {name!r} expects {dtype} dims {dims}, but "
                    f"{model_file.name} has {onnx_type} dims {shape[1:]}"
                )

    def _load_factored(self, path: Path, threads: int) -> None:
        try:
            factored = _ort_session(path, threads)
        except Exception as exc:  # ONNX Runtime's own error types: the model file alone still serves
            pb_utils.Logger.log_warn(f"{self.model_name}: {path.name} does not load ({exc}): not used")
            return
        # One user's 64 candidates, with indices past every vocabulary too (both clamp them).
        rng = np.random.default_rng(0)
        n = 64
        probe = {}
        for name, dtype, dims in self.inputs:
            rows = 1 if name in ONE_ROW_INPUTS else n
            if dtype == "TYPE_FP32":
                probe[name] = (0.3 * rng.standard_normal((rows, *dims))).astype(np.float32)
            else:
                probe[name] = rng.integers(0, 1000, (rows, *dims)).astype(np.int64)
        full = {name: np.repeat(value, n, axis=0) if len(value) == 1 else value for name, value in probe.items()}
        diff = float(np.abs(self._run(full).reshape(-1) - factored.run(None, probe)[0].reshape(-1)).max())
        if not diff <= FACTORED_TOLERANCE:
            pb_utils.Logger.log_warn(
                f"{self.model_name}: {path.name} differs from the model by {diff:.3g} (more than "
                f"{FACTORED_TOLERANCE:g}): not used, every request runs the model file"
            )
            return
        self.factored = factored
        pb_utils.Logger.log_info(
            f"{self.model_name}: one-user requests run {path.name} (max |score diff| {diff:.2g} on a probe)"
        )

    def _load_torchscript(self, model_file: Path, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.module = torch.jit.load(str(model_file))
        probe = [
            torch.zeros((1, *dims), dtype=getattr(torch, "float32" if d == "TYPE_FP32" else "int64"))
            for _, d, dims in self.inputs
        ]
        try:
            with torch.no_grad():
                self.module(*probe)
        except RuntimeError as exc:
            shapes = {name: dims for name, _, dims in self.inputs}
            raise pb_utils.TritonModelException(
                f"{self.model_name}: {model_file.name} rejects inputs shaped as the config says {shapes}: {exc}"
            ) from exc

    def _run(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        if self.runtime == "onnxruntime":
            return np.asarray(self.session.run(None, tensors)[0], dtype=np.float32)
        import torch

        with torch.no_grad():
            out = self.module(*(torch.from_numpy(tensors[name]) for name, _, _ in self.inputs))
        return out.numpy().astype(np.float32)

    def execute(self, requests: list[Any]) -> list[Any]:
        # The dynamic batcher hands over several requests at once. Requests of one user each run the factored
        # graph one by one: it saves about 30% of the work, where merging 1,000 rows saved 7% per row on CPU
        # (docs/BENCHMARKS.md, batching). Otherwise they run as one batch, then split.
        columns: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in self.inputs}
        sizes = []
        for request in requests:
            for name, dtype, _ in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                columns[name].append(tensor.astype(_NUMPY_DTYPES[dtype], copy=False))
            sizes.append(len(columns[self.inputs[0][0]][-1]))
        if self.factored is not None:
            one_user = [t for t in (self._one_user(columns, k) for k in range(len(requests))) if t is not None]
            if len(one_user) == len(requests):
                return [
                    pb_utils.InferenceResponse([pb_utils.Tensor(self.output, self._run_factored(tensors))])
                    for tensors in one_user
                ]
        # A lone request runs on its own arrays: copying 200 rows into a batch of one cost 38 us of the stub's
        # CPU per request (5 inputs, 200 rows; 4 us without), measured in process.
        batch = {name: parts[0] if len(parts) == 1 else np.concatenate(parts) for name, parts in columns.items()}
        scores = self._run(batch).reshape(-1, 1)
        responses = []
        for part in np.split(scores, np.cumsum(sizes)[:-1]):
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, part)]))
        return responses

    @staticmethod
    def _one_user(columns: dict[str, list[np.ndarray]], k: int) -> dict[str, np.ndarray] | None:
        """Request ``k``'s tensors with one row of each per-user input, or None if its rows differ there."""
        tensors = {name: parts[k] for name, parts in columns.items()}
        for name in ONE_ROW_INPUTS:
            value = tensors[name]
            if not len(value) or not (value == value[:1]).all():
                return None
            tensors[name] = value[:1]
        return tensors

    def _run_factored(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.factored.run(None, tensors)[0], dtype=np.float32).reshape(-1, 1)
