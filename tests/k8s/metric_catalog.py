"""What each exporter exports, and what the shipped rules, dashboard and adapter rules read: the
catalogue tests/k8s/test_monitoring.py checks names against, and tests/integration/test_metric_names.py
compares with a running Triton. Helpers only: no tests here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.k8s.render import K8S, Obj, find, of_kind, overlay, read_yaml

MONITORING = K8S / "components" / "monitoring"
ADAPTER_VALUES = MONITORING / "prometheus-adapter-values.yaml"

# Triton 2.51 (NGC 24.10), docs/user_guide/metrics.md: per-model counters and latencies (microseconds),
# the pending-request gauge, and the GPU and CPU gauges (GPU ones only where Triton sees a GPU).
TRITON_METRICS = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_pending_request_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_gpu_utilization",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
    }
)
TRITON_GPU_ONLY = frozenset(name for name in TRITON_METRICS if name.startswith(("nv_gpu_", "nv_energy_")))
# oliver006/redis_exporter (exporter/exporter.go: INFO fields mapped under the `redis` namespace).
REDIS_EXPORTER_METRICS = frozenset(
    {
        "redis_up",
        "redis_memory_used_bytes",
        "redis_memory_max_bytes",
        "redis_connected_clients",
        "redis_commands_processed_total",
        "redis_evicted_keys_total",
        "redis_expired_keys_total",
        "redis_keyspace_hits_total",
        "redis_keyspace_misses_total",
        "redis_rejected_connections_total",
    }
)
# kube-state-metrics (docs/metrics/workload/cronjob-metrics.md, both STABLE).
KUBE_STATE_METRICS = frozenset({"kube_cronjob_status_last_successful_time", "kube_cronjob_created"})
# Labels the Prometheus Operator puts on every PodMonitor target.
OPERATOR_TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint", "service"})


def orchestrator_metrics() -> dict[str, tuple[str, ...]]:
    """Every series name the orchestrator exports -> its label names (histogram buckets add `le`)."""
    from prometheus_client.metrics import MetricWrapperBase

    import orchestrator.metrics

    out: dict[str, tuple[str, ...]] = {}
    for collector in vars(orchestrator.metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        labels = tuple(collector._labelnames)
        for family in collector.describe():
            if family.type == "counter":  # the family is named without _total; the series with it
                out[f"{family.name}_total"] = labels
            elif family.type == "histogram":
                out[f"{family.name}_bucket"] = (*labels, "le")
                out[f"{family.name}_sum"] = labels
                out[f"{family.name}_count"] = labels
            elif family.type == "summary":
                out[f"{family.name}_sum"] = labels
                out[f"{family.name}_count"] = labels
            else:
                out[family.name] = labels
    return out


KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels and durations left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers (and prometheus-adapter's <<.LabelMatchers>>)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        token, rest = match.group(), text[match.end() :].lstrip()
        if token in KEYWORDS or rest.startswith("("):
            continue
        names.add(token)
    return names


def rule_groups() -> list[dict[str, Any]]:
    (rule,) = of_kind(overlay("gpu-t4"), "PrometheusRule")
    return list(rule["spec"]["groups"])


def alerts() -> list[dict[str, Any]]:
    return [r for group in rule_groups() for r in group["rules"] if "alert" in r]


def alert(name: str) -> dict[str, Any]:
    (found,) = [a for a in alerts() if a["alert"] == name]
    return found


def dashboard_exprs(objects: list[Obj]) -> list[str]:
    cm = find(objects, "ConfigMap", "recserve-grafana-dashboard")
    dashboard = json.loads(cm["data"]["recserve-dashboard.json"])
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def adapter_rules() -> list[dict[str, Any]]:
    return list(read_yaml(ADAPTER_VALUES)["rules"]["custom"])


def used_metric_names() -> dict[str, set[str]]:
    """Where -> the metric names it reads: the alert rules, the dashboard, the prometheus-adapter rules."""
    sources = {
        "alert rules": [a["expr"] for a in alerts()],
        "dashboard": dashboard_exprs(overlay("gpu-t4")),
        "prometheus-adapter": [query for r in adapter_rules() for query in (r["seriesQuery"], r["metricsQuery"])],
    }
    return {where: {name for expr in exprs for name in metric_names(expr)} for where, exprs in sources.items()}
