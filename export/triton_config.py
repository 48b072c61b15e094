"""Triton model configs, built as ``ModelConfig`` protobuf objects from one typed spec per profile.

Profiles:
- ``gpu-t4`` (production, committed as ``model_repository/<model>/config.pbtxt``): the native ONNX
  Runtime (with TensorRT FP16) and LibTorch backends on the GPU.
- ``cpu`` (local and CI, rendered under ``build/``): the very same model files served by the Python
  backend (``export/triton_python_backend/model.py``) on the CPU.

Both share the dynamic-batching block, so what is measured locally is the same policy that ships.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from orchestrator import schema

Profile = Literal["gpu-t4", "cpu"]
PROFILES: tuple[Profile, ...] = ("gpu-t4", "cpu")
Runtime = Literal["onnxruntime", "torchscript"]

_DTYPES = {"float32": mc.TYPE_FP32, "int64": mc.TYPE_INT64}
CPU_INSTANCES = 2


@dataclass(frozen=True)
class BatchingSpec:
    """Dynamic batching, in rows (one row = one user x candidate pair).

    A request carries ~100-200 candidates, so preferred sizes are a few requests' worth; 5 ms of queue
    delay on a T4 fills a 1024-row batch at a few thousand requests/s without breaking a 100 ms budget.
    """

    max_batch_size: int = 1024
    preferred_batch_sizes: tuple[int, ...] = (256, 512, 1024)
    max_queue_delay_microseconds: int = 5000

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size}")
        if any(not 1 <= size <= self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError(
                f"preferred_batch_sizes must lie in 1..max_batch_size ({self.max_batch_size}), "
                f"got {list(self.preferred_batch_sizes)}"
            )
        if self.max_queue_delay_microseconds < 0:
            raise ValueError(f"max_queue_delay_microseconds must be >= 0, got {self.max_queue_delay_microseconds}")


@dataclass(frozen=True)
class ModelSpec:
    """One served model: its name, runtime, file name and tensor names."""

    name: str
    runtime: Runtime
    filename: str
    output_name: str
    embedding_dim: int = 128
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    warmup_batch_sizes: tuple[int, ...] = (1, 128, 1024)
    instance_count: int | None = None  # None: the profile's default (see build_config)
    cpu_threads: int = 1  # intra-op threads per instance in the cpu profile


def ranker_models(embedding_dim: int = 128, batching: BatchingSpec | None = None) -> tuple[ModelSpec, ...]:
    """The ranker, once per runtime. LibTorch names outputs by position, hence ``score__0``."""
    batching = batching or BatchingSpec()
    return (
        ModelSpec("ranker_onnx", "onnxruntime", "model.onnx", schema.RANKER_OUTPUT.name, embedding_dim, batching),
        ModelSpec("ranker_torchscript", "torchscript", "model.pt", "score__0", embedding_dim, batching),
    )


def build_config(model: ModelSpec, profile: Profile) -> mc.ModelConfig:
    """The ``ModelConfig`` of ``model`` under ``profile``."""
    model.batching.validate()
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {list(PROFILES)}, got {profile!r}")
    config = mc.ModelConfig(name=model.name, max_batch_size=model.batching.max_batch_size)
    for spec in schema.ranker_inputs(model.embedding_dim):
        config.input.add(name=spec.name, data_type=_DTYPES[spec.dtype], dims=[spec.width])
    config.output.add(name=model.output_name, data_type=mc.TYPE_FP32, dims=[1])
    batching = config.dynamic_batching
    batching.preferred_batch_size.extend(model.batching.preferred_batch_sizes)
    batching.max_queue_delay_microseconds = model.batching.max_queue_delay_microseconds

    if profile == "gpu-t4":
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=model.instance_count or 1)
        config.default_model_filename = model.filename
        if model.runtime == "onnxruntime":
            config.platform = "onnxruntime_onnx"
            trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            trt.parameters["precision_mode"] = "FP16"
            trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
            # Building TensorRT engines takes minutes; the cache (a volume in k8s) makes restarts fast.
            trt.parameters["trt_engine_cache_enable"] = "1"
            trt.parameters["trt_engine_cache_path"] = "/trt-engine-cache"
        else:
            config.platform = "pytorch_libtorch"
            config.parameters["INFERENCE_MODE"].string_value = "true"
    else:
        config.backend = "python"
        # One single-threaded instance per core: measured 1.76x the rows/s of one instance on 2 cores
        # (docs/BENCHMARKS.md, ranker section); intra-op threads inside one instance do worse.
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=model.instance_count or CPU_INSTANCES)
        config.parameters["runtime"].string_value = model.runtime
        config.parameters["model_file"].string_value = model.filename
        config.parameters["intra_op_threads"].string_value = str(model.cpu_threads)
    # Triton runs these on every instance before it reports the model ready: TensorRT builds its engines,
    # ONNX Runtime and the Python stub allocate their buffers, so a fresh pod's first requests do not pay
    # for it past their deadline. Zero data: index 0 is every vocabulary's "unknown", always valid.
    for size in model.warmup_batch_sizes:
        if size > model.batching.max_batch_size:
            continue
        warmup = config.model_warmup.add(name=f"batch_{size}", batch_size=size)
        for spec in schema.ranker_inputs(model.embedding_dim):
            tensor = warmup.inputs[spec.name]
            tensor.data_type = _DTYPES[spec.dtype]
            tensor.dims.extend([spec.width])
            tensor.zero_data = True
    return config


def render(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt text with Triton's own protobuf: what Triton would accept or reject."""
    return text_format.Parse(text, mc.ModelConfig())


def render_inputs_summary(config: mc.ModelConfig) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, dims) of every input, for comparing a config with a model file."""
    return {tensor.name: (mc.DataType.Name(tensor.data_type), list(tensor.dims)) for tensor in config.input}
