from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.artifacts import MODEL_REPOSITORY
from export.triton_config import (
    PROFILES,
    ROWS_PER_REQUEST,
    BatchingSpec,
    build_config,
    parse,
    ranker_models,
    render,
)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("model", ranker_models(), ids=lambda m: m.name)
def test_every_config_parses_back_with_triton_modelconfig(profile, model) -> None:
    config = build_config(model, profile)
    assert parse(render(config)) == config


def test_gpu_profile_is_native_gpu_with_tensorrt_fp16_and_warmup() -> None:
    onnx, torchscript = (build_config(m, "gpu-t4") for m in ranker_models())
    assert onnx.platform == "onnxruntime_onnx" and torchscript.platform == "pytorch_libtorch"
    for config in (onnx, torchscript):
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert config.dynamic_batching.max_queue_delay_microseconds == 5000
        assert list(config.dynamic_batching.preferred_batch_size) == [200, 400, 600, 800, 1000]
        assert [w.batch_size for w in config.model_warmup] == [1, 128, 1024]
    (trt,) = onnx.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert trt.parameters["precision_mode"] == "FP16"
    assert trt.parameters["trt_engine_cache_enable"] == "1"


def test_cpu_profile_serves_the_same_files_through_the_python_backend() -> None:
    for model in ranker_models():
        gpu, cpu = build_config(model, "gpu-t4"), build_config(model, "cpu")
        assert cpu.backend == "python" and not cpu.platform
        assert cpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert cpu.parameters["model_file"].string_value == model.filename
        # The same batching block but for the queue delay (below).
        cpu_batching, gpu_batching = mc.ModelDynamicBatching(), mc.ModelDynamicBatching()
        cpu_batching.CopyFrom(cpu.dynamic_batching)
        gpu_batching.CopyFrom(gpu.dynamic_batching)
        cpu_batching.ClearField("max_queue_delay_microseconds")
        gpu_batching.ClearField("max_queue_delay_microseconds")
        assert cpu_batching == gpu_batching
        assert list(cpu.input) == list(gpu.input) and list(cpu.output) == list(gpu.output)
        # Both warm every instance up before reporting ready, with the same zero-data batches.
        assert list(cpu.model_warmup) == list(gpu.model_warmup) and len(cpu.model_warmup) == 3


def test_queue_delay_is_the_profiles_own_unless_the_spec_sets_one() -> None:
    """The batching study recommends 0 ms on the CPU (a delay there is pure latency); the GPU keeps 5 ms."""
    for model in ranker_models():
        assert build_config(model, "cpu").dynamic_batching.max_queue_delay_microseconds == 0
        assert build_config(model, "gpu-t4").dynamic_batching.max_queue_delay_microseconds == 5000
    swept = BatchingSpec(max_queue_delay_microseconds=1000)  # what the benchmarks' sweeps pass
    for profile in PROFILES:
        config = build_config(ranker_models(batching=swept)[0], profile)
        assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    # 0 renders as proto3's default: the cpu config.pbtxt does not spell the field out, and parses back to 0.
    cpu_text = render(build_config(ranker_models()[0], "cpu"))
    assert "max_queue_delay_microseconds" not in cpu_text
    assert parse(cpu_text).dynamic_batching.max_queue_delay_microseconds == 0


def test_queue_timeout_is_checked_against_the_delay_of_the_profile_rendered() -> None:
    """A queue timeout must exceed the delay of every profile the spec may render for, else of the one asked."""
    short = BatchingSpec(queue_timeout_microseconds=3000)
    short.validate("cpu")  # 3 ms > 0 ms
    with pytest.raises(ValueError, match=r"must exceed max_queue_delay_microseconds \(5000\), got 3000"):
        short.validate("gpu-t4")
    with pytest.raises(ValueError, match=r"must exceed max_queue_delay_microseconds \(5000\), got 3000"):
        short.validate()
    assert build_config(ranker_models(batching=short)[0], "cpu").dynamic_batching.max_queue_delay_microseconds == 0
    with pytest.raises(ValueError, match=r"\(5000\), got 3000"):
        build_config(ranker_models(batching=short)[0], "gpu-t4")


def test_committed_gpu_configs_match_the_spec() -> None:
    """The committed config.pbtxt files are generated: they must not drift from the typed spec."""
    for model in ranker_models():
        committed = (MODEL_REPOSITORY / model.name / "config.pbtxt").read_text()
        assert text_format.Parse(committed, mc.ModelConfig()) == build_config(model, "gpu-t4")


def test_preferred_batch_sizes_are_whole_requests() -> None:
    """A preferred size no sum of requests reaches is never met: every batch would wait the full delay."""
    from orchestrator.config import RankingSettings

    assert RankingSettings().n_candidates == ROWS_PER_REQUEST, "rows per ranking request changed: re-derive"
    for profile in PROFILES:
        for model in ranker_models():
            batching = build_config(model, profile).dynamic_batching
            sizes = list(batching.preferred_batch_size)
            assert sizes and all(size % ROWS_PER_REQUEST == 0 for size in sizes), sizes
            max_batch = build_config(model, profile).max_batch_size
            assert max(sizes) + ROWS_PER_REQUEST > max_batch, "the largest batch of whole requests must be preferred"


def _realtime_budget_ms(env: dict[str, str]) -> float:
    """What the orchestrator gives a computed answer (deadline minus the fallback reserve) under ``env``."""
    from orchestrator.config import DeadlineSettings, environment_variables

    # A renamed variable would make ``env`` silently irrelevant here.
    assert {"RECSERVE_DEADLINE_REQUEST_MS", "RECSERVE_DEADLINE_FALLBACK_RESERVE_MS"} <= {
        name for name, _ in environment_variables()
    }
    deadline = DeadlineSettings()
    request_ms = float(env.get("RECSERVE_DEADLINE_REQUEST_MS", deadline.request_ms))
    reserve_ms = float(env.get("RECSERVE_DEADLINE_FALLBACK_RESERVE_MS", deadline.fallback_reserve_ms))
    return request_ms - reserve_ms


@pytest.mark.parametrize("profile", PROFILES)
def test_queue_policy_rejects_before_the_orchestrator_gives_up(profile) -> None:
    """A request that waited in Triton's queue past the orchestrator's budget is dropped, not computed."""
    k8s_env = dict(
        line.split("=", 1)
        for line in (MODEL_REPOSITORY.parent / "k8s" / "base" / "recserve.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    budget_ms = min(_realtime_budget_ms({}), _realtime_budget_ms(k8s_env))
    for model in ranker_models():
        batching = build_config(model, profile).dynamic_batching
        policy = batching.default_queue_policy
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
        assert policy.allow_timeout_override is True, "a client may ask for what is left of its own deadline"
        assert batching.max_queue_delay_microseconds < policy.default_timeout_microseconds < budget_ms * 1000, (
            f"queue timeout {policy.default_timeout_microseconds} us must lie between the batching delay "
            f"({batching.max_queue_delay_microseconds} us) and the real-time budget ({budget_ms} ms)"
        )
        assert 0 < policy.max_queue_size <= 1024, f"the queue must be bounded, found {policy.max_queue_size}"
    # The rendered text carries the policy, so the committed files do too (test below).
    assert "default_queue_policy" in render(build_config(ranker_models()[0], profile))


def test_queue_policy_can_be_turned_off() -> None:
    """The benchmarks measure saturation without it: 0 and 0 leave no default_queue_policy at all."""
    off = BatchingSpec(queue_timeout_microseconds=0, max_queue_size=0)
    config = build_config(ranker_models(batching=off)[0], "cpu")
    assert not config.dynamic_batching.HasField("default_queue_policy")


def test_bad_batching_is_rejected_with_the_rule() -> None:
    bad = BatchingSpec(max_batch_size=64, preferred_batch_sizes=(128,))
    with pytest.raises(ValueError, match=r"preferred_batch_sizes must lie in 1..max_batch_size \(64\)"):
        build_config(ranker_models(batching=bad)[0], "cpu")
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
        BatchingSpec(max_batch_size=0, preferred_batch_sizes=()).validate()
    with pytest.raises(
        ValueError, match=r"queue_timeout_microseconds must exceed max_queue_delay_microseconds \(5000\)"
    ):
        BatchingSpec(queue_timeout_microseconds=5000).validate()
    with pytest.raises(ValueError, match="queue_timeout_microseconds must be >= 0"):
        BatchingSpec(queue_timeout_microseconds=-1).validate()
    with pytest.raises(ValueError, match="max_queue_size must be an integer >= 0"):
        BatchingSpec(max_queue_size=-1).validate()


def test_a_config_with_a_typo_does_not_parse(tmp_path: Path) -> None:
    text = render(build_config(ranker_models()[0], "cpu")).replace("max_batch_size", "max_batchsize")
    with pytest.raises(text_format.ParseError, match="max_batchsize"):
        parse(text)
