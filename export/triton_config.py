"""Triton model configs, built as ``ModelConfig`` protobuf objects from one typed spec per profile.

Profiles:
- ``gpu-t4`` (production, committed as ``model_repository/<model>/config.pbtxt``): the native ONNX
  Runtime (with TensorRT FP16) and LibTorch backends on the GPU.
- ``cpu`` (local and CI, rendered under ``build/``): the very same model files served by the Python
  backend (``export/triton_python_backend/model.py``) on the CPU.

Both share the dynamic-batching block (sizes, queue policy) but for the queue delay, which is each profile's
own (``PROFILE_MAX_QUEUE_DELAY_MICROSECONDS``): what pays on a GPU is pure latency on a CPU.
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


# Rows the orchestrator sends per ranking request: RankingSettings.n_candidates (orchestrator/config.py);
# tests/unit/test_triton_config.py pins that the two agree.
ROWS_PER_REQUEST = 200
MAX_BATCH_SIZE = 1024
# Every whole number of requests that fits a batch: 200, 400, ..., 1000. Triton sends a batch at once when
# it reaches a preferred size (core's DynamicBatchScheduler::GetDynamicBatch); sizes that no sum of 200-row
# requests can reach (the former 256/512/1024) are never met, so every batch short of 6 requests waited
# out the full queue delay: +5 ms at low load for nothing (BENCHMARKS.md, cpu profile, one client: p50
# 6.9 ms at 5 ms delay against 1.7 ms at 0 ms).
# With every multiple listed, a lone request runs at once, and under load, while the instance is busy,
# the queue grows and the next batch takes the largest multiple waiting (up to 1000 rows). The queue delay
# still bounds the wait of requests of other sizes (a candidate dropped for a missing embedding).
PREFERRED_BATCH_SIZES = tuple(range(ROWS_PER_REQUEST, MAX_BATCH_SIZE + 1, ROWS_PER_REQUEST))
# Triton's queue policy (REJECT on timeout). The orchestrator's real-time budget for a request is
# deadline.request_ms - deadline.fallback_reserve_ms: 80 ms by default, 60 ms in k8s/base/recserve.env
# (80 - 20). The Redis reads and retrieval before ranking take 2-18 ms (BENCHMARKS.md, service section)
# and the model a few more, so a request that has waited 40 ms in Triton's queue can no longer be answered
# in time: Triton drops it (UNAVAILABLE, "Request timeout expired") instead of computing what nobody waits
# for, and the orchestrator answers from the fallback. Tests pin it under both budgets. REJECT is the
# enum's zero value, so the rendered config.pbtxt does not spell it out (proto3 omits defaults).
QUEUE_TIMEOUT_MICROSECONDS = 40_000
# Requests (not rows). At the capacity plan's T4 rate (~2,000 requests/s, docs/CAPACITY.md) about 80
# queued requests leave in 40 ms; 128 leaves headroom over that assumption, and beyond it a request is
# refused at once (UNAVAILABLE) instead of timing out after 40 ms: memory and wasted time stay bounded.
MAX_QUEUE_SIZE = 128


# How long the batcher may hold a request to fill a larger batch, per profile (microseconds).
# gpu-t4: 5 ms fills a 1000-row batch at a few thousand requests/s without breaking a 100 ms budget; on a GPU
# one execution of 1000 rows costs about what one of 200 does, so the wait buys throughput.
# cpu: 0. The batching study (docs/BENCHMARKS.md, batching section, bench/batching.py) found that on the CPU
# the model's work grows with the rows, so a delay buys no throughput under load (0 ms ties the best delay
# at 8+ clients: requests already queue while the instance is busy and merge up to 1000 rows per
# execution), while at low load it is pure added latency (1 client: p50 1.7 ms at 0 ms, 6.9 ms at 5 ms).
PROFILE_MAX_QUEUE_DELAY_MICROSECONDS: dict[Profile, int] = {"gpu-t4": 5000, "cpu": 0}


@dataclass(frozen=True)
class BatchingSpec:
    """Dynamic batching, in rows (one row = one user x candidate pair), and the queue in front of it.

    ``max_queue_delay_microseconds`` None takes the profile's delay (``PROFILE_MAX_QUEUE_DELAY_MICROSECONDS``);
    a number sets it for every profile (the benchmarks' sweeps, the tests). ``queue_timeout_microseconds`` 0
    and ``max_queue_size`` 0 turn the queue policy off.
    """

    max_batch_size: int = MAX_BATCH_SIZE
    preferred_batch_sizes: tuple[int, ...] = PREFERRED_BATCH_SIZES
    max_queue_delay_microseconds: int | None = None
    queue_timeout_microseconds: int = QUEUE_TIMEOUT_MICROSECONDS
    max_queue_size: int = MAX_QUEUE_SIZE

    def queue_delay_microseconds(self, profile: Profile) -> int:
        """The delay rendered under ``profile``: the spec's own, else the profile's."""
        if self.max_queue_delay_microseconds is not None:
            return self.max_queue_delay_microseconds
        return PROFILE_MAX_QUEUE_DELAY_MICROSECONDS[profile]

    def validate(self, profile: Profile | None = None) -> None:
        """Check the rules for ``profile``, or for every profile when None (a spec may render under any)."""
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size}")
        if any(not 1 <= size <= self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError(
                f"preferred_batch_sizes must lie in 1..max_batch_size ({self.max_batch_size}), "
                f"got {list(self.preferred_batch_sizes)}"
            )
        if self.max_queue_delay_microseconds is not None and self.max_queue_delay_microseconds < 0:
            raise ValueError(f"max_queue_delay_microseconds must be >= 0, got {self.max_queue_delay_microseconds}")
        if self.queue_timeout_microseconds < 0:
            raise ValueError(
                f"queue_timeout_microseconds must be >= 0 (0: none), got {self.queue_timeout_microseconds}"
            )
        delay = max(self.queue_delay_microseconds(p) for p in ((profile,) if profile else PROFILES))
        if 0 < self.queue_timeout_microseconds <= delay:
            # Every request would be rejected while the batcher still waits for it to form a batch.
            raise ValueError(
                f"queue_timeout_microseconds must exceed max_queue_delay_microseconds "
                f"({delay}), got {self.queue_timeout_microseconds}"
            )
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be an integer >= 0 (0: unbounded), got {self.max_queue_size}")


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
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {list(PROFILES)}, got {profile!r}")
    model.batching.validate(profile)
    config = mc.ModelConfig(name=model.name, max_batch_size=model.batching.max_batch_size)
    # Every version folder in the repository is served: a new model version (``python -m export publish``)
    # is served beside the active one, and a retired one goes with its folder (docs/RELEASES.md).
    config.version_policy.all.SetInParent()
    for spec in schema.ranker_inputs(model.embedding_dim):
        config.input.add(name=spec.name, data_type=_DTYPES[spec.dtype], dims=[spec.width])
    config.output.add(name=model.output_name, data_type=mc.TYPE_FP32, dims=[1])
    batching = config.dynamic_batching
    batching.preferred_batch_size.extend(model.batching.preferred_batch_sizes)
    batching.max_queue_delay_microseconds = model.batching.queue_delay_microseconds(profile)
    if model.batching.queue_timeout_microseconds or model.batching.max_queue_size:
        queue = batching.default_queue_policy
        queue.timeout_action = mc.ModelQueuePolicy.REJECT
        queue.default_timeout_microseconds = model.batching.queue_timeout_microseconds
        # A client may ask for less (tritonclient's per-request `timeout`, in microseconds): the time
        # actually left of its own deadline.
        queue.allow_timeout_override = True
        queue.max_queue_size = model.batching.max_queue_size

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
