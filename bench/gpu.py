"""The ranker on a GPU: TorchScript on CUDA, ONNX Runtime's GPU providers, and what batching buys.

A standalone script for a borrowed GPU machine: it imports only the standard library, numpy, torch and,
where they are installed, onnxruntime and tritonclient; never ``export`` or ``orchestrator``, since it
runs under that machine's own python3. It reads a model folder made here by ``--prepare``:

    model.onnx   the ranker, exported by export.model_export.export_onnx (what ranker_onnx serves)
    model.pt     the same ranker, traced by export.model_export.export_torchscript (ranker_torchscript)
    spec.json    input tensor names, dtypes, widths and categorical vocabulary sizes
                 (orchestrator.schema.ranker_inputs), the output name, and the versions that wrote them
    tritonserver.tar.xz  optional (--pack-triton): the tritonserver binary, its Python backend and stubs,
                 and the shared libraries they load, from the nvidia-pytriton wheel installed here

What it measures, each figure the median (and p99) of many timed calls after a warm-up:

* TorchScript on the device, fp32 and fp16 (the module cast with ``.half()``), at batch 1 to 1024: inputs
  already on the device (the model alone), host numpy in and out (what a server pays per request), and
  fp32/fp16 replayed from a captured CUDA graph (the launch-overhead floor a compiled engine approaches);
* ONNX Runtime with the CUDA and TensorRT providers where this onnxruntime has them; otherwise ONNX Runtime
  on the CPU, one intra-op thread (as a cpu-profile Triton instance runs it), at a few sizes for reference;
* batching for 32 clients of 200 rows each: off = 32 forward calls one after another (one model instance,
  no batcher) and 32 calls from 32 threads on their own CUDA streams (32 instances, no batcher); on = one
  6,400-row forward (what a batcher with no size cap forms) and 1,000-row forwards (what the shipped config,
  max_batch_size 1024, forms from 200-row requests);
* the same through a real tritonserver (Python backend running this TorchScript file on the device) at 32
  closed-loop gRPC clients, dynamic batching on and off, where the server, its Python stub and tritonclient
  can run; otherwise the JSON says exactly why not.

Writes one JSON file (--out) and prints a markdown table last. ``--device cpu --quick`` runs every path on
the CPU in seconds, to prove the script before spending GPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

BATCH_SIZES = (1, 8, 32, 64, 128, 200, 256, 512, 1024)
CPU_ORT_SIZES = (1, 32, 200, 1024)
CLIENTS = 32
ROWS_PER_REQUEST = 200
SHIPPED_MAX_BATCH = 1024  # model_repository/ranker_onnx/config.pbtxt
TRITON_ARCHIVE = "tritonserver.tar.xz"

Inputs = dict[str, np.ndarray]
HostCall = Callable[[Inputs], np.ndarray]


# ----------------------------------------------------------------------------------------------- inputs


def load_spec(model_dir: Path) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads((model_dir / "spec.json").read_text())
    return spec


def make_inputs(spec: dict[str, Any], rows: int, seed: int) -> Inputs:
    """Random but valid inputs: unit-norm float embeddings, in-vocabulary categorical indices."""
    rng = np.random.default_rng(seed)
    out: Inputs = {}
    for tensor in spec["inputs"]:
        if tensor["dtype"] == "float32":
            x = rng.normal(size=(rows, tensor["width"])).astype(np.float32)
            out[tensor["name"]] = x / np.linalg.norm(x, axis=1, keepdims=True)
        else:
            out[tensor["name"]] = np.stack([rng.integers(0, size, rows) for size in tensor["vocab"]], axis=1)
    return out


def concat(requests: list[Inputs]) -> Inputs:
    return {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}


# ----------------------------------------------------------------------------------------------- timing


def summarise(seconds: list[float], rows: int) -> dict[str, Any]:
    ms = np.asarray(seconds) * 1e3
    p50 = float(np.median(ms))
    return {
        "rows": rows,
        "runs": len(seconds),
        "p50_ms": round(p50, 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "rows_per_s": round(rows / (p50 / 1e3)),
    }


def time_calls(fn: Callable[[], object], budget_s: float, warmup: int, min_runs: int, max_runs: int) -> list[float]:
    """Wall time of each call; ``fn`` must return only once its work is done (it synchronises)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() < stop):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


class Budget:
    """Per-point time budgets: small on the CPU smoke run, larger on the device."""

    def __init__(self, quick: bool) -> None:
        self.point_s = 0.04 if quick else 0.25
        self.warmup = 3 if quick else 10
        self.min_runs = 5 if quick else 30
        self.max_runs = 200 if quick else 3000
        self.rounds_s = 0.2 if quick else 1.5
        self.triton_warm_s = 0.5 if quick else 1.0
        self.triton_measure_s = 1.0 if quick else 3.0


# ------------------------------------------------------------------------------------------- torchscript


class TorchRunner:
    """One TorchScript module on one device in one float dtype."""

    def __init__(self, path: Path, spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location=device)
        self.module = module.to(dtype).eval()
        self.names = [t["name"] for t in spec["inputs"]]
        self.device = device
        self.dtype = dtype

    def to_device(self, inputs: Inputs) -> list[torch.Tensor]:
        tensors = []
        for name in self.names:
            t = torch.from_numpy(inputs[name]).to(self.device)
            tensors.append(t.to(self.dtype) if t.is_floating_point() else t)
        return tensors

    def forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = self.module(*tensors)
        return out

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def host_call(self, inputs: Inputs) -> np.ndarray:
        """Host numpy in, host numpy out: the copies a server pays. ``.cpu()`` waits for the stream."""
        result: np.ndarray = self.forward(self.to_device(inputs)).float().cpu().numpy().reshape(-1)
        return result


def cuda_graph_call(runner: TorchRunner, tensors: list[torch.Tensor]) -> Callable[[], None]:
    """Capture one forward at this batch size; the returned call replays it and waits."""
    stream = torch.cuda.Stream(runner.device)
    stream.wait_stream(torch.cuda.current_stream(runner.device))
    with torch.cuda.stream(stream):
        for _ in range(5):  # let the TorchScript profiling executor settle on its optimised graph first
            runner.forward(tensors)
    torch.cuda.current_stream(runner.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        runner.module(*tensors)

    def replay() -> None:
        graph.replay()
        runner.sync()

    return replay


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    got64 = got.astype(np.float64)
    if not np.all(np.isfinite(got64)):
        return float("inf")
    return float(np.linalg.norm(got64 - ref) / np.linalg.norm(ref))


def reference_scores(path: Path, spec: dict[str, Any], inputs: Inputs) -> np.ndarray:
    """float64 on the CPU: the yardstick for every device result."""
    runner = TorchRunner(path, spec, torch.device("cpu"), torch.float64)
    return runner.host_call(inputs).astype(np.float64)


def torch_sweep(
    runner: TorchRunner, spec: dict[str, Any], sizes: tuple[int, ...], budget: Budget
) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        host = make_inputs(spec, n, seed=n)
        tensors = runner.to_device(host)

        def on_device(tensors: list[torch.Tensor] = tensors) -> None:
            runner.forward(tensors)
            runner.sync()

        def host_to_host(host: Inputs = host) -> None:
            runner.host_call(host)

        args = (budget.point_s, budget.warmup, budget.min_runs, budget.max_runs)
        point: dict[str, Any] = {"batch": n}
        point["device_resident"] = summarise(time_calls(on_device, *args), n)
        point["host_to_host"] = summarise(time_calls(host_to_host, *args), n)
        rows.append(point)
        print(f"  batch {n:5d}: {_brief(point)}", flush=True)
    return rows


def graph_sweep(runner: TorchRunner, spec: dict[str, Any], points: list[dict[str, Any]], budget: Budget) -> None:
    """CUDA-graph replays at each batch size, added to ``points``. Run after everything else in this
    process: a failed capture can leave the CUDA context unusable."""
    args = (budget.point_s, budget.warmup, budget.min_runs, budget.max_runs)
    for point in points:
        n = point["batch"]
        try:
            replay = cuda_graph_call(runner, runner.to_device(make_inputs(spec, n, seed=n)))
            point["cuda_graph"] = summarise(time_calls(replay, *args), n)
        except Exception as exc:  # capture can fail on some executors; the rest still stands
            point["cuda_graph"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"  batch {n:5d}: {_brief(point)}", flush=True)


def _brief(point: dict[str, Any]) -> str:
    parts = []
    for key in ("device_resident", "host_to_host", "cuda_graph", "ort"):
        if key in point and "p50_ms" in point[key]:
            parts.append(f"{key} {point[key]['p50_ms']:.3f} ms")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- batching


def batching_study(
    call: HostCall,
    spec: dict[str, Any],
    budget: Budget,
    thread_call: Callable[[int, Inputs], np.ndarray] | None = None,
) -> dict[str, Any]:
    """32 requests of 200 rows: served one by one, from 32 threads, merged into one or into 1,000-row forwards.

    Each variant is timed as whole rounds (all 32 requests answered); rows/s = 6,400 / median round."""
    requests = [make_inputs(spec, ROWS_PER_REQUEST, seed=1000 + i) for i in range(CLIENTS)]
    total_rows = CLIENTS * ROWS_PER_REQUEST
    per_merge = max(1, SHIPPED_MAX_BATCH // ROWS_PER_REQUEST)

    def off_serial() -> None:
        for r in requests:
            call(r)

    def merged(group: int) -> Callable[[], None]:
        def run() -> None:
            for start in range(0, CLIENTS, group):
                part = requests[start : start + group]
                scores = call(concat(part))
                np.split(scores, np.cumsum([ROWS_PER_REQUEST] * (len(part) - 1)))

        return run

    variants: dict[str, Callable[[], None]] = {"off_serial": off_serial}
    pool: ThreadPoolExecutor | None = None
    if thread_call is not None:
        pool = ThreadPoolExecutor(CLIENTS)
        threaded = thread_call

        def off_threads() -> None:
            assert pool is not None
            list(pool.map(threaded, range(CLIENTS), requests))

        variants["off_32_threads"] = off_threads
    variants["on_merged_6400"] = merged(CLIENTS)
    variants[f"on_capped_{per_merge * ROWS_PER_REQUEST}"] = merged(per_merge)

    # Same answers whichever way the requests travel (fp rounding aside).
    single = np.concatenate([call(r) for r in requests])
    together = call(concat(requests))
    result: dict[str, Any] = {
        "clients": CLIENTS,
        "rows_per_request": ROWS_PER_REQUEST,
        "merged_vs_single_max_abs_diff": float(np.max(np.abs(single - together))),
    }
    try:
        for name, fn in variants.items():
            try:
                samples = time_calls(fn, budget.rounds_s, warmup=3, min_runs=5, max_runs=500)
                result[name] = summarise(samples, total_rows)
            except Exception as exc:  # one variant failing (say, threads) leaves the others standing
                result[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        if pool is not None:
            pool.shutdown()

    def ratio(on: str, off: str) -> float | None:
        if "rows_per_s" in result.get(on, {}) and "rows_per_s" in result.get(off, {}):
            return round(result[on]["rows_per_s"] / result[off]["rows_per_s"], 2)
        return None

    capped = f"on_capped_{per_merge * ROWS_PER_REQUEST}"
    result["ratio_on_merged_vs_off_serial"] = ratio("on_merged_6400", "off_serial")
    result["ratio_on_capped_vs_off_serial"] = ratio(capped, "off_serial")
    if "off_32_threads" in result:
        result["ratio_on_merged_vs_off_32_threads"] = ratio("on_merged_6400", "off_32_threads")
    return result


def torch_thread_call(runner: TorchRunner) -> Callable[[int, Inputs], np.ndarray]:
    """Each client thread on its own CUDA stream, as separate model instances would run."""
    streams = [torch.cuda.Stream(runner.device) for _ in range(CLIENTS)]

    def call(i: int, inputs: Inputs) -> np.ndarray:
        with torch.cuda.stream(streams[i]):
            return runner.host_call(inputs)

    return call


# ------------------------------------------------------------------------------------------ onnxruntime


def onnxruntime_section(model_dir: Path, spec: dict[str, Any], budget: Budget, device: str) -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"skipped": f"onnxruntime is not importable here ({exc})"}
    available = list(ort.get_available_providers())
    section: dict[str, Any] = {"version": ort.__version__, "available_providers": available, "runs": {}}
    output = spec["output"]["name"]
    gpu_providers: list[tuple[str, list[Any]]] = []
    if device == "cuda":
        cache = Path(tempfile.mkdtemp(prefix="trt-cache-"))
        trt_options = {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_max_workspace_size": 1 << 30,
        }
        candidates: list[tuple[str, list[Any]]] = [
            ("TensorrtExecutionProvider", [("TensorrtExecutionProvider", trt_options), "CUDAExecutionProvider"]),
            ("CUDAExecutionProvider", ["CUDAExecutionProvider"]),
        ]
        gpu_providers = [(name, providers) for name, providers in candidates if name in available]
    if device == "cuda" and not gpu_providers:
        section["gpu_providers"] = (
            "none: this onnxruntime offers only "
            + ", ".join(available)
            + " (the CUDA and TensorRT providers ship in the separate onnxruntime-gpu wheel)"
        )
    runs: list[tuple[str, list[Any], tuple[int, ...], int]] = [
        (name, providers, BATCH_SIZES, 0) for name, providers in gpu_providers
    ]
    if not gpu_providers:
        runs.append(("CPUExecutionProvider (1 intra-op thread)", ["CPUExecutionProvider"], CPU_ORT_SIZES, 1))
    for label, providers, sizes, threads in runs:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            started = time.perf_counter()
            session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=providers)
            create_s = time.perf_counter() - started
        except Exception as exc:
            section["runs"][label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        used = session.get_providers()
        if providers[0] != "CPUExecutionProvider" and used[0] == "CPUExecutionProvider":
            section["runs"][label] = {"error": f"session fell back to {used}"}
            continue

        def call(inputs: Inputs, session: Any = session) -> np.ndarray:
            result: np.ndarray = session.run([output], inputs)[0].reshape(-1)
            return result

        points = []
        print(f"onnxruntime {label}: session {create_s:.2f} s, providers {used}", flush=True)
        args = (budget.point_s, budget.warmup, budget.min_runs, budget.max_runs)
        for n in sizes:
            host = make_inputs(spec, n, seed=n)
            first = time.perf_counter()
            call(host)  # TensorRT builds an engine on the first call at each new shape
            first_s = time.perf_counter() - first

            def run(host: Inputs = host, call: HostCall = call) -> None:
                call(host)

            point = {"batch": n, "ort": summarise(time_calls(run, *args), n), "first_call_s": round(first_s, 3)}
            points.append(point)
            print(f"  batch {n:5d}: {_brief(point)} (first call {first_s:.3f} s)", flush=True)
        check = make_inputs(spec, 256, seed=7)
        ref = reference_scores(model_dir / "model.pt", spec, check)
        section["runs"][label] = {
            "providers_used": used,
            "session_create_s": round(create_s, 3),
            "relative_error_vs_fp64": relative_error(call(check), ref),
            "sweep": points,
            "batching": batching_study(call, spec, budget),
        }
    return section


# --------------------------------------------------------------------------------------- tritonserver

TRITON_MODEL_PY = """
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

_DTYPES = {"TYPE_FP32": torch.float32, "TYPE_INT64": torch.int64}

class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.device = torch.device(params["device"])
        self.names = [t["name"] for t in config["input"]]
        self.output = config["output"][0]["name"]
        self.module = torch.jit.load(params["model_path"], map_location=self.device).eval()
        # Every batch size the batcher can form (multiples of 200 rows), so no timed call pays a first-shape cost.
        with torch.inference_mode():
            for rows in range(200, int(config["max_batch_size"]) + 1, 200):
                warm = [
                    torch.zeros((rows, int(t["dims"][0])), dtype=_DTYPES[t["data_type"]], device=self.device)
                    for t in config["input"]
                ]
                self.module(*warm)


    def execute(self, requests):
        arrays = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.names] for r in requests]
        sizes = [a[0].shape[0] for a in arrays]
        with torch.inference_mode():
            tensors = [
                torch.from_numpy(np.concatenate([a[k] for a in arrays]) if len(arrays) > 1 else arrays[0][k])
                .to(self.device)
                for k in range(len(self.names))
            ]
            scores = self.module(*tensors).float().cpu().numpy()
        responses, start = [], 0
        for n in sizes:
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, scores[start : start + n])]))
            start += n
        return responses
"""

_TRITON_DTYPES = {"float32": ("TYPE_FP32", "FP32"), "int64": ("TYPE_INT64", "INT64")}

# name -> (max_batch_size, dynamic_batching block or "" for none)
TRITON_CONFIGS = {
    "ranker_off": (SHIPPED_MAX_BATCH, ""),
    "ranker_on": (
        SHIPPED_MAX_BATCH,
        "dynamic_batching {\n  preferred_batch_size: [200, 400, 600, 800, 1000]\n"
        "  max_queue_delay_microseconds: 5000\n}\n",
    ),
    "ranker_on_uncapped": (
        CLIENTS * ROWS_PER_REQUEST,
        "dynamic_batching {\n  max_queue_delay_microseconds: 5000\n}\n",
    ),
}
TRITON_LABELS = {
    "ranker_off": "off: no dynamic_batching block, max_batch_size 1024",
    "ranker_on": "on: shipped settings (max_batch_size 1024, preferred 200/400/600/800/1000, 5 ms)",
    "ranker_on_uncapped": "on: max_batch_size 6400, 5 ms",
}


# Lines after which tritonserver never becomes ready (it would only time out much later).
FATAL_LOG_LINES = ("error while loading shared libraries", "failed to load '", "Traceback")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _model_config(name: str, spec: dict[str, Any], model_pt: Path, device: str) -> str:
    max_batch, batching = TRITON_CONFIGS[name]
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch}"]
    for t in spec["inputs"]:
        lines.append(f'input {{ name: "{t["name"]}" data_type: {_TRITON_DTYPES[t["dtype"]][0]} dims: [{t["width"]}] }}')
    lines.append(f'output {{ name: "{spec["output"]["name"]}" data_type: TYPE_FP32 dims: [1] }}')
    lines.append("instance_group { count: 1 kind: KIND_CPU }")  # the model places itself on the device
    lines.append(f'parameters {{ key: "model_path" value: {{ string_value: "{model_pt}" }} }}')
    lines.append(f'parameters {{ key: "device" value: {{ string_value: "{device}" }} }}')
    return "\n".join(lines) + "\n" + batching


def find_triton(model_dir: Path, workdir: Path) -> tuple[Path | None, str]:
    """(folder holding pytriton/ and nvidia_pytriton.libs/, how it was found) or (None, why not)."""
    archive = model_dir / TRITON_ARCHIVE
    if archive.is_file():
        target = workdir / "triton"
        started = time.perf_counter()
        with tarfile.open(archive) as tar:
            if sys.version_info >= (3, 12):
                tar.extractall(target, filter="tar")
            else:
                tar.extractall(target)
        return target, f"unpacked {archive} in {time.perf_counter() - started:.1f} s"
    try:
        import pytriton
    except ImportError:
        return None, f"no tritonserver: neither {archive} nor the nvidia-pytriton package is here"
    return Path(pytriton.__file__).parent.parent, "the installed nvidia-pytriton package"


def _python_backend(root: Path, workdir: Path) -> tuple[Path, Path]:
    """(tritonserver binary, backend dir holding this interpreter's Python-backend stub)."""
    server = root / "pytriton" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"no Python-backend stub for Python {version} in {server}")
    backends = workdir / "backends"
    shutil.copytree(server / "backends", backends)
    shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
    return server / "bin" / "tritonserver", backends


def _libpython_dir() -> Path:
    """The stub embeds libpython: without the shared library it cannot start."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY") or ""
    candidate = Path(libdir) / soname
    if not soname.endswith((".so", ".so.1.0")) or not candidate.exists():
        raise RuntimeError(
            f"this Python has no shared libpython ({candidate} is missing), which the Python-backend stub embeds"
        )
    return candidate.parent


@contextlib.contextmanager
def tritonserver(
    binary: Path, backends: Path, repo: Path, log: Path, libpython: Path, timeout_s: float
) -> Iterator[str]:
    """Start tritonserver on free ports in a session of its own; yield its gRPC url; stop it and its stubs."""
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    env = os.environ.copy()
    # The stub is copied out of the wheel, so its $ORIGIN-relative RPATH no longer finds the bundled libcudart.
    bundled = binary.parents[3] / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(bundled), str(libpython), env.get("LD_LIBRARY_PATH", "")])
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The stub's embedded interpreter must see this interpreter's packages (torch, numpy).
    paths = [p for p in sys.path[1:] if p and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    command = [
        str(binary),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--metrics-port={metrics_port}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--log-verbose=0",
    ]
    with log.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"127.0.0.1:{grpc_port}"
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {process.returncode}")
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    break
            text = log.read_text(errors="replace") if log.exists() else ""
            fatal = [m for m in FATAL_LOG_LINES if m in text]
            if fatal:
                raise RuntimeError(f"tritonserver log reports {fatal[0]!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s")
            time.sleep(0.25)
        client.close()
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def _closed_loop(url: str, model: str, spec: dict[str, Any], warm_s: float, measure_s: float) -> dict[str, Any]:
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    requests = []
    for i in range(CLIENTS):
        inputs = make_inputs(spec, ROWS_PER_REQUEST, seed=2000 + i)
        tensors = []
        for t in spec["inputs"]:
            tensor = aioclient.InferInput(t["name"], list(inputs[t["name"]].shape), _TRITON_DTYPES[t["dtype"]][1])
            tensor.set_data_from_numpy(inputs[t["name"]])
            tensors.append(tensor)
        requests.append(tensors)
    outputs = [aioclient.InferRequestedOutput(spec["output"]["name"])]
    latencies: list[float] = []
    measuring = asyncio.Event()
    stop = asyncio.Event()

    async def one_client(i: int) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await client.infer(model, requests[i], outputs=outputs)
            if measuring.is_set() and not stop.is_set():
                latencies.append(time.perf_counter() - started)

    async def stats() -> tuple[int, int, int]:
        s = (await client.get_inference_statistics(model, as_json=True))["model_stats"][0]
        infer = int(s.get("inference_count", 0))
        executions = int(s.get("execution_count", 0))
        compute_ns = int(s["inference_stats"].get("compute_infer", {}).get("ns", 0))
        return infer, executions, compute_ns

    tasks = [asyncio.create_task(one_client(i)) for i in range(CLIENTS)]
    await asyncio.sleep(warm_s)
    before = await stats()
    cpu_before = time.process_time()
    measuring.set()
    started = time.perf_counter()
    await asyncio.sleep(measure_s)
    stop.set()
    wall = time.perf_counter() - started
    after = await stats()
    cpu = time.process_time() - cpu_before
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    rows = (after[0] - before[0]) if after[0] > before[0] else len(latencies) * ROWS_PER_REQUEST
    executions = after[1] - before[1]
    ms = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies),
        "rows_per_s": round(len(latencies) * ROWS_PER_REQUEST / wall),
        "p50_ms": round(float(np.median(ms)), 3) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 3) if len(ms) else None,
        "server_rows": rows,
        "executions": executions,
        "rows_per_execution": round(rows / executions, 1) if executions else None,
        "compute_infer_ms_per_execution": round((after[2] - before[2]) / 1e6 / executions, 3) if executions else None,
        "client_cpu_cores": round(cpu / wall, 2),
    }


def triton_section(
    model_dir: Path, spec: dict[str, Any], device: str, budget: Budget, time_left_s: float
) -> dict[str, Any]:
    """Real tritonserver, Python backend running model.pt, 32 closed-loop gRPC clients, batching on and off."""
    if time_left_s < 60:
        return {"skipped": f"only {time_left_s:.0f} s of the run's budget left"}
    try:
        import tritonclient.grpc.aio  # noqa: F401
    except Exception as exc:
        return {"skipped": f"tritonclient[grpc] is not importable here ({type(exc).__name__}: {exc})"}
    if not Path("/dev/shm").is_dir() or not os.access("/dev/shm", os.W_OK):
        return {"skipped": "no writable /dev/shm, which the Python backend passes tensors through"}
    workdir = Path(tempfile.mkdtemp(prefix="gpu-triton-"))
    section: dict[str, Any] = {"backend": "python (the only backend the nvidia-pytriton wheel ships)"}
    log = workdir / "tritonserver.log"
    try:
        root, found = find_triton(model_dir, workdir)
        if root is None:
            return {"skipped": found}
        section["server_from"] = found
        libpython = _libpython_dir()
        binary, backends = _python_backend(root, workdir)
        repo = workdir / "models"
        for name in TRITON_CONFIGS:
            (repo / name / "1").mkdir(parents=True)
            (repo / name / "1" / "model.py").write_text(TRITON_MODEL_PY)
            (repo / name / "config.pbtxt").write_text(
                _model_config(name, spec, (model_dir / "model.pt").resolve(), device)
            )
        started = time.perf_counter()
        with tritonserver(binary, backends, repo, log, libpython, timeout_s=min(150.0, time_left_s - 30)) as url:
            section["startup_s"] = round(time.perf_counter() - started, 1)
            print(f"tritonserver ready in {section['startup_s']} s ({found})", flush=True)
            results: dict[str, Any] = {}
            for name in TRITON_CONFIGS:
                results[name] = asyncio.run(
                    _closed_loop(url, name, spec, budget.triton_warm_s, budget.triton_measure_s)
                ) | {"config": TRITON_LABELS[name]}
                print(f"  {name}: {results[name]}", flush=True)
            section["clients"] = CLIENTS
            section["rows_per_request"] = ROWS_PER_REQUEST
            section["results"] = results
            off = results["ranker_off"]["rows_per_s"]
            section["ratio_on_vs_off"] = round(results["ranker_on"]["rows_per_s"] / off, 2) if off else None
            section["ratio_on_uncapped_vs_off"] = (
                round(results["ranker_on_uncapped"]["rows_per_s"] / off, 2) if off else None
            )
    except Exception as exc:
        section["error"] = f"{type(exc).__name__}: {exc}"[:600]
        if log.exists():
            text = log.read_text(errors="replace").splitlines()
            section["log_errors"] = [line[:400] for line in text if line.startswith("E") or "rror" in line][:30]
            section["log_tail"] = "\n".join(text[-25:])[-3000:]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return section


# ---------------------------------------------------------------------------------------------- machine


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda_runtime": torch.version.cuda,
        }
        with contextlib.suppress(Exception):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["nvidia_smi"] = smi.stdout.strip()
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


# ---------------------------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = []
    sweeps = report["torchscript"]
    dtypes = [d for d in ("fp32", "fp16") if d in sweeps and "sweep" in sweeps[d]]
    header = ["batch"]
    for d in dtypes:
        header += [f"TS {d} on device p50 ms", f"TS {d} host→host p50 / p99 ms", f"TS {d} CUDA graph p50 ms"]
    header += [f"{d} rows/s host→host" for d in dtypes]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---:" * len(header) + "|")
    for i, n in enumerate(report["batch_sizes"]):
        row = [str(n)]
        for d in dtypes:
            p = sweeps[d]["sweep"][i]
            graph = p.get("cuda_graph", {})
            row += [
                f"{p['device_resident']['p50_ms']:.3f}",
                f"{p['host_to_host']['p50_ms']:.3f} / {p['host_to_host']['p99_ms']:.3f}",
                f"{graph['p50_ms']:.3f}" if "p50_ms" in graph else "–",
            ]
        row += [f"{sweeps[d]['sweep'][i]['host_to_host']['rows_per_s']:,}" for d in dtypes]
        lines.append("| " + " | ".join(row) + " |")
    for label, run in report["onnxruntime"].get("runs", {}).items():
        if "sweep" not in run:
            continue
        lines.append("")
        lines.append(f"| ONNX Runtime {label}: batch | p50 ms | p99 ms | rows/s |")
        lines.append("|---:|---:|---:|---:|")
        for p in run["sweep"]:
            o = p["ort"]
            lines.append(f"| {p['batch']} | {o['p50_ms']:.3f} | {o['p99_ms']:.3f} | {o['rows_per_s']:,} |")
    lines.append("")
    lines.append(f"| batching, {CLIENTS} clients x {ROWS_PER_REQUEST} rows | round p50 ms | rows/s | vs off (serial) |")
    lines.append("|---|---:|---:|---:|")
    studies = [(f"TorchScript {d}", sweeps[d]["batching"]) for d in dtypes if "batching" in sweeps[d]]
    studies += [
        (f"ORT {k}", v["batching"]) for k, v in report["onnxruntime"].get("runs", {}).items() if "batching" in v
    ]
    for label, study in studies:
        off = study.get("off_serial", {}).get("rows_per_s")
        for key, value in study.items():
            if isinstance(value, dict) and "rows_per_s" in value and off:
                ratio = value["rows_per_s"] / off
                lines.append(f"| {label}: {key} | {value['p50_ms']:.2f} | {value['rows_per_s']:,} | {ratio:.2f}x |")
    triton = report.get("triton", {})
    lines.append("")
    if "results" in triton:
        lines.append(
            "| tritonserver, 32 gRPC clients x 200 rows | rows/s | p50 ms | p99 ms | rows/execution | "
            "compute ms/execution | client CPU cores |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in triton["results"].values():
            lines.append(
                f"| {r['config']} | {r['rows_per_s']:,} | {r['p50_ms']} | {r['p99_ms']} | {r['rows_per_execution']} | "
                f"{r['compute_infer_ms_per_execution']} | {r['client_cpu_cores']} |"
            )
        lines.append(
            f"\ntritonserver on / off: {triton['ratio_on_vs_off']}x (shipped), "
            f"{triton['ratio_on_uncapped_vs_off']}x (uncapped)"
        )
    else:
        lines.append(f"tritonserver: not measured: {triton.get('skipped') or triton.get('error')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- prepare


def prepare(out_dir: Path, embedding_dim: int | None, pack_triton: bool) -> None:
    """Write the untrained ranker (weights do not matter for speed) with the project's own exporters."""
    from export import model_export
    from export.models import Ranker
    from export.train import TrainConfig

    dim = embedding_dim or TrainConfig.embedding_dim
    torch.manual_seed(0)
    ranker = Ranker(dim).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = model_export.export_onnx(ranker, out_dir / "model.onnx")
    ts_path = model_export.export_torchscript(ranker, out_dir / "model.pt")
    batches = {"random": [model_export.example_inputs(dim, n, seed=n) for n in (1, 7, 1024)]}
    model_export.check_parity("onnx", model_export.onnx_runner(onnx_path), ranker, batches)
    model_export.check_parity("torchscript", model_export.torchscript_runner(ts_path, dim), ranker, batches)
    # Names, order, dtypes and widths are orchestrator.schema.ranker_inputs, as export builds them (bench may
    # not import the service's package itself); vocabulary sizes are the ranker's own embedding tables.
    tables = {
        "user_features": ranker.user_feature_embeddings,
        "item_features": ranker.item_feature_embeddings,
        "context_features": ranker.context_embeddings,
    }
    example = model_export.example_inputs(dim, 1)
    spec = {
        "model": "export.models.Ranker, untrained (torch.manual_seed(0))",
        "embedding_dim": dim,
        "inputs": [
            {
                "name": name,
                "dtype": str(array.dtype),
                "width": int(array.shape[1]),
                "vocab": [t.num_embeddings for t in tables[name] if isinstance(t, torch.nn.Embedding)]
                if name in tables
                else None,
            }
            for name, array in example.items()
        ],
        "output": {"name": onnx_output_name(onnx_path), "dtype": "float32", "width": 1},
        "onnx_opset": model_export.ONNX_OPSET,
        "written_by": {"torch": torch.__version__, "python": platform.python_version()},
        "parameters": sum(p.numel() for p in ranker.parameters()),
    }
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"wrote {onnx_path}, {ts_path} and {out_dir / 'spec.json'} (embedding dim {dim})")
    if pack_triton:
        pack_tritonserver(out_dir / TRITON_ARCHIVE)


def onnx_output_name(path: Path) -> str:
    import onnx

    name: str = onnx.load(str(path)).graph.output[0].name
    return name


def pack_tritonserver(archive: Path) -> None:
    """tritonserver, its Python backend, every stub and the bundled libraries it loads (from ldd), xz'd."""
    import pytriton

    root = Path(pytriton.__file__).parent.parent
    server = root / "pytriton" / "tritonserver"
    binaries = [server / "bin" / "tritonserver", server / "backends" / "python" / "libtriton_python.so"]
    libs: set[Path] = set()
    for binary in binaries:
        ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
        for line in ldd.splitlines():
            parts = line.split("=>")
            if len(parts) == 2 and "nvidia_pytriton.libs" in parts[1]:
                libs.add(Path(parts[1].split()[0]).resolve())
    members = [*binaries, server / "backends" / "python" / "triton_python_backend_utils.py"]
    members += sorted((server / "python_backend_stubs").rglob("triton_python_backend_stub"))
    members += sorted(libs)
    with tempfile.NamedTemporaryFile("w", suffix=".list", delete=False) as listing:
        listing.write("\n".join(str(m.relative_to(root)) for m in members) + "\n")
    env = os.environ | {"XZ_OPT": "-6 -T0"}
    subprocess.run(["tar", "-C", str(root), "-cJf", str(archive), "-T", listing.name], check=True, env=env)
    os.unlink(listing.name)
    print(f"wrote {archive} ({archive.stat().st_size / 2**20:.1f} MiB, {len(members)} files)")


# ------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    model_dir: Path = args.model_dir
    spec = load_spec(model_dir)
    want = args.device
    if want == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (use --device cpu for the smoke run)")
    device = torch.device(want)
    budget = Budget(args.quick)
    sizes = BATCH_SIZES
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": want,
        "machine": machine_info(device),
        "model": {k: spec[k] for k in ("model", "embedding_dim", "parameters", "written_by") if k in spec},
        "batch_sizes": list(sizes),
        "torchscript": {},
    }
    print(json.dumps(report["machine"]), flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; fp16 is measured on its own
        torch.backends.cudnn.allow_tf32 = False

    check = make_inputs(spec, 256, seed=7)
    ref = reference_scores(model_dir / "model.pt", spec, check)
    dtypes = {"fp32": torch.float32} | ({"fp16": torch.float16} if device.type == "cuda" else {})
    runners: dict[str, TorchRunner] = {}
    for label, dtype in dtypes.items():
        if args.triton_only:
            break
        print(f"TorchScript {label} on {want}", flush=True)
        entry: dict[str, Any] = {}
        try:
            loaded = time.perf_counter()
            runner = TorchRunner(model_dir / "model.pt", spec, device, dtype)
            entry["load_s"] = round(time.perf_counter() - loaded, 3)
            entry["relative_error_vs_fp64"] = relative_error(runner.host_call(check), ref)
            entry["sweep"] = torch_sweep(runner, spec, sizes, budget)
            runners[label] = runner
            thread_call = torch_thread_call(runner) if device.type == "cuda" else None
            entry["batching"] = batching_study(runner.host_call, spec, budget, thread_call)
            print(f"  batching: {json.dumps(entry['batching'])}", flush=True)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:600]
            print(f"  failed: {entry['error']}", flush=True)
        report["torchscript"][label] = entry

    report["onnxruntime"] = (
        {"skipped": "--triton-only"} if args.triton_only else onnxruntime_section(model_dir, spec, budget, want)
    )
    if device.type == "cuda":
        for label, runner in runners.items():
            print(f"TorchScript {label}, CUDA graph replay", flush=True)
            graph_sweep(runner, spec, report["torchscript"][label]["sweep"], budget)
    if args.skip_triton:
        report["triton"] = {"skipped": "--skip-triton"}
    else:
        report["triton"] = triton_section(model_dir, spec, want, budget, args.budget_s - (time.monotonic() - started))
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model-dir", type=Path, default=Path(".gpu"))
    parser.add_argument("--out", type=Path, help="JSON report path")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--triton-only", action="store_true", help="only the tritonserver part (a smoke run)")
    parser.add_argument("--budget-s", type=float, default=210.0, help="the Triton part starts only inside this")
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="write the model folder here and exit")
    parser.add_argument("--dim", type=int, help="with --prepare: embedding dim (default: the pipeline's)")
    parser.add_argument("--pack-triton", action="store_true", help=f"with --prepare: also write {TRITON_ARCHIVE}")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.dim, args.pack_triton)
        return 0
    report = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n## Ranker on {report['machine'].get('gpu', want_label(args.device))} ({report['machine']['date_utc']})\n")
    print(markdown(report))
    print(f"\nelapsed {report['elapsed_s']} s" + (f"; JSON in {args.out}" if args.out else ""), flush=True)
    return 0


def want_label(device: str) -> str:
    return "the CPU" if device == "cpu" else device


if __name__ == "__main__":
    sys.exit(main())
