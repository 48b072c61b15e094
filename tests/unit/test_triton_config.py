from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.artifacts import MODEL_REPOSITORY
from export.triton_config import PROFILES, BatchingSpec, build_config, parse, ranker_models, render


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
        assert list(config.dynamic_batching.preferred_batch_size) == [256, 512, 1024]
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
        assert cpu.dynamic_batching == gpu.dynamic_batching
        assert list(cpu.input) == list(gpu.input) and list(cpu.output) == list(gpu.output)
        # Both warm every instance up before reporting ready, with the same zero-data batches.
        assert list(cpu.model_warmup) == list(gpu.model_warmup) and len(cpu.model_warmup) == 3


def test_committed_gpu_configs_match_the_spec() -> None:
    """The committed config.pbtxt files are generated: they must not drift from the typed spec."""
    for model in ranker_models():
        committed = (MODEL_REPOSITORY / model.name / "config.pbtxt").read_text()
        assert text_format.Parse(committed, mc.ModelConfig()) == build_config(model, "gpu-t4")


def test_bad_batching_is_rejected_with_the_rule() -> None:
    bad = BatchingSpec(max_batch_size=64, preferred_batch_sizes=(128,))
    with pytest.raises(ValueError, match=r"preferred_batch_sizes must lie in 1..max_batch_size \(64\)"):
        build_config(ranker_models(batching=bad)[0], "cpu")
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
        BatchingSpec(max_batch_size=0, preferred_batch_sizes=()).validate()


def test_a_config_with_a_typo_does_not_parse(tmp_path: Path) -> None:
    text = render(build_config(ranker_models()[0], "cpu")).replace("max_batch_size", "max_batchsize")
    with pytest.raises(text_format.ParseError, match="max_batchsize"):
        parse(text)
