"""The Triton metric names the alert rules, the dashboard and the prometheus-adapter rule read, against a
running tritonserver's /metrics (the nvidia-pytriton wheel's, serving the cpu profile with the queue policy
of export/triton_config.py, so this also shows Triton accepts that policy). GPU gauges appear only where
Triton sees a GPU: on a machine without one they are checked against Triton 2.51's documented names only
(tests/k8s/test_monitoring.py)."""

from __future__ import annotations

import urllib.request

import pytest

from stack.triton_launcher import TritonServer
from tests.k8s.metric_catalog import TRITON_GPU_ONLY, TRITON_METRICS, used_metric_names

pytestmark = pytest.mark.integration


def scraped_names(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    names |= {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}
    return names


def test_triton_exports_every_nv_metric_we_read(triton: TritonServer) -> None:
    exported = scraped_names(triton.metrics_url)
    assert "nv_inference_request_success" in exported, sorted(exported)
    used = {name for names in used_metric_names().values() for name in names if name.startswith("nv_")}
    assert used <= TRITON_METRICS
    has_gpu = any(name.startswith("nv_gpu_") for name in exported)
    expected = used if has_gpu else used - TRITON_GPU_ONLY
    missing = expected - exported
    assert not missing, f"read by rules/dashboard/adapter, not exported by this Triton: {sorted(missing)}"
    # The catalogue the offline tests check against is what Triton really exports (no name misspelt there).
    catalogue = TRITON_METRICS if has_gpu else TRITON_METRICS - TRITON_GPU_ONLY
    assert catalogue <= exported, f"in the catalogue, not exported: {sorted(catalogue - exported)}"
