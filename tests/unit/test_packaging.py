"""What pyproject.toml promises about Python versions and extras: the online service on 3.11-3.13, the torch pin
only in the export extra, the GPU builds as an extra whose conflict with the CPU builds is documented, tracing
as an extra the dev install and the online image carry. (That the sets resolve: docs/DEPLOY.md's dry runs.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
ONLINE = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}
PYTHONS = ("3.11", "3.12", "3.13")


def applies(req: Requirement, python: str) -> bool:
    return req.marker is None or req.marker.evaluate({"python_version": python, "python_full_version": python + ".0"})


def test_the_online_service_installs_on_3_11_to_3_13_and_the_tools_target_3_11() -> None:
    supported = SpecifierSet(PROJECT["requires-python"])
    assert all(v in supported for v in PYTHONS), f"{PROJECT['requires-python']} must admit {PYTHONS}"
    assert "3.10" not in supported
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == "3.11"
    assert "PYTHON ?= python3.11" in (REPO / "Makefile").read_text(), "CI (make test) keeps testing 3.11"


def test_exactly_one_numpy_requirement_per_python_and_one_with_wheels_on_3_13() -> None:
    for python in PYTHONS:
        numpy = [r for r in ONLINE if r.name == "numpy" and applies(r, python)]
        assert len(numpy) == 1, f"Python {python}: expected one numpy requirement, found {numpy}"
    (on_313,) = [r for r in ONLINE if r.name == "numpy" and applies(r, "3.13")]
    assert not on_313.specifier.contains("1.26.4") and on_313.specifier.contains("2.1.0"), on_313
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("numpy==")]
    assert len(pins) == 1 and not applies(Requirement(pins[0]), "3.13"), f"the 1.26 pin must skip 3.13: {pins}"


def test_torch_only_in_the_export_extra_pinned() -> None:
    assert "torch" not in {r.name for r in ONLINE}
    holders = [name for name, reqs in EXTRAS.items() if "torch" in {r.name for r in reqs}]
    assert holders == ["export"], holders
    (torch,) = [r for r in EXTRAS["export"] if r.name == "torch"]
    assert str(torch.specifier).startswith("=="), torch


def test_the_gpu_extra_brings_the_cuda_12_builds_and_documents_the_swap() -> None:
    assert {r.name for r in EXTRAS["gpu"]} == {"onnxruntime-gpu", "faiss-gpu-cu12"}
    assert {"onnxruntime", "faiss-cpu"} <= {r.name for r in ONLINE}, "the CPU builds stay the default"
    deploy = (REPO / "docs" / "DEPLOY.md").read_text()
    for step in (
        "pip install -c constraints.txt '.[gpu]'",
        "pip uninstall -y onnxruntime faiss-cpu",
        "--force-reinstall --no-deps onnxruntime-gpu faiss-gpu-cu12",
    ):
        assert step in deploy, f"docs/DEPLOY.md must give the step {step!r}"


def test_tracing_is_an_extra_the_dev_install_and_the_online_image_carry() -> None:
    assert {r.name for r in EXTRAS["telemetry"]} == {
        "opentelemetry-api",
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-proto-grpc",
    }
    assert "telemetry" not in {r.name for r in ONLINE}
    assert "dev,telemetry]" in (REPO / "Makefile").read_text()
    assert '".[telemetry]"' in (REPO / "k8s" / "docker" / "orchestrator.Dockerfile").read_text()
