"""Monitoring as shipped in k8s/: PodMonitors for the orchestrator, Triton and Redis, the alert rules
(PrometheusRule, unit-tested with `promtool test rules`), the prometheus-adapter rules the HPAs read,
and the Grafana dashboard.

Every metric name a rule, a panel or an adapter rule reads must be one its exporter exports: the
orchestrator's come from its own registry (orchestrator/metrics.py, with the _total/_bucket/_sum/_count
series prometheus_client writes), Triton's from the names Triton 2.51 documents (a running Triton's
/metrics is compared with them in tests/integration/test_metric_names.py), Redis's from redis_exporter's
source, and the pre-compute's age from kube-state-metrics (the orchestrator exports none).

PodMonitor and PrometheusRule are CRD objects kubernetes-validate has no schema for: their shape is
checked here field by field.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s.metric_catalog import (
    KUBE_STATE_METRICS,
    OPERATOR_TARGET_LABELS,
    REDIS_EXPORTER_METRICS,
    TRITON_METRICS,
    adapter_rules,
    alert,
    alerts,
    dashboard_exprs,
    metric_names,
    orchestrator_metrics,
    rule_groups,
    used_metric_names,
)
from tests.k8s.render import (
    OVERLAYS,
    Obj,
    containers,
    cpu_dev_with_optional_components,
    find,
    ingress_sources,
    of_kind,
    overlay,
    pod_template,
    read_yaml,
    selects,
    unknown_keys,
    workloads,
)

PROMTOOL_TEST = Path(__file__).parent / "promtool" / "recserve-alerts.test.yaml"
OBJECTIVE_P99_S = 0.1  # docs/DESIGN: sub-100 ms p99


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (le) (rate(a_bucket{job="x", le="0.1"}[5m])) / on () group_left () '
        "(b_total or vector(0)) > 13 * 3600 + 1e-9 unless c{<<.LabelMatchers>>}"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(params=["gpu-t4", "cpu-dev+components"])
def monitored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """An overlay with the monitoring component: gpu-t4 as shipped, cpu-dev with it switched on."""
    if request.param == "gpu-t4":
        return overlay("gpu-t4")
    return cpu_dev_with_optional_components(tmp_path_factory)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "promtool is not installed: `make system-deps` installs it (Debian's prometheus package), "
            "or take it from a Prometheus release"
        )
    return found


# ---------------------------------------------------------------------------------------- PodMonitors

SCRAPED = {"orchestrator": 8080, "triton": 8002, "redis-cluster": 9121}


def test_podmonitors_scrape_the_orchestrator_triton_and_redis(monitored: list[Obj]) -> None:
    monitors = {m["metadata"]["name"]: m for m in of_kind(monitored, "PodMonitor")}
    assert set(monitors) == set(SCRAPED), sorted(monitors)
    by_name = {w["metadata"]["name"]: w for w in workloads(monitored)}
    bad: list[str] = []
    for name, port_number in SCRAPED.items():
        monitor = monitors[name]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        bad += unknown_keys(monitor, {"apiVersion", "kind", "metadata", "spec"}, name)
        spec = monitor["spec"]
        bad += unknown_keys(spec, {"jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector"}, f"{name}.spec")
        workload = by_name[name]
        labels = pod_template(workload)["metadata"]["labels"]
        assert selects(spec["selector"], labels), f"{name}: the selector misses the pods"
        # The job label (rules and panels select by it) is the pod's name label, present on every pod.
        assert spec["jobLabel"] == "app.kubernetes.io/name" and labels[spec["jobLabel"]] == name
        (endpoint,) = spec["podMetricsEndpoints"]
        bad += unknown_keys(endpoint, {"port", "path", "interval", "honorLabels", "scheme"}, f"{name}.endpoint")
        ports = {p["name"]: p["containerPort"] for c in containers(workload) for p in c.get("ports", [])}
        assert ports.get(endpoint["port"]) == port_number, f"{name}: port {endpoint['port']!r} of {ports}"
        assert endpoint["path"] == "/metrics"
        # Prometheus (namespace monitoring) may open that port.
        assert "ns:monitoring" in ingress_sources(monitored, name, port_number), name
    assert not bad, f"fields the PodMonitor CRD does not define: {bad}"


def test_orchestrator_labels_survive_the_operator_target_labels(monitored: list[Obj]) -> None:
    """A metric label named like a target label is renamed exported_<label> unless honorLabels is set."""
    clashing = {label for labels in orchestrator_metrics().values() for label in labels} & OPERATOR_TARGET_LABELS
    (endpoint,) = find(monitored, "PodMonitor", "orchestrator")["spec"]["podMetricsEndpoints"]
    if clashing:
        assert endpoint.get("honorLabels") is True, f"metric labels {sorted(clashing)} clash with target labels"


# ------------------------------------------------------------------------------------------- the rules


def test_prometheusrule_shape(monitored: list[Obj]) -> None:
    (rule,) = of_kind(monitored, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    bad = unknown_keys(rule, {"apiVersion", "kind", "metadata", "spec"}, "PrometheusRule")
    bad += unknown_keys(rule["spec"], {"groups"}, "spec")
    for group in rule["spec"]["groups"]:
        bad += unknown_keys(group, {"name", "interval", "rules"}, f"group {group['name']}")
        for r in group["rules"]:
            bad += unknown_keys(r, {"alert", "record", "expr", "for", "labels", "annotations"}, str(r.get("alert")))
            if "alert" in r:
                assert r["labels"]["severity"] in {"page", "warning"}, r["alert"]
                assert {"summary", "description"} <= set(r["annotations"]), r["alert"]
                assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
    assert not bad, f"fields the PrometheusRule CRD does not define: {bad}"


# What the monitoring must alert on -> the alert that does, and a metric its expression must read.
REQUIRED_ALERTS = {
    "p99 over the objective": ("RecserveLatencyP99AboveObjective", "recserve_request_latency_seconds_bucket"),
    "fallback share": ("RecserveFallbackShareHigh", "recserve_fallbacks_total"),
    "error rate": ("RecserveErrorRateHigh", "recserve_shed_total"),
    "Triton queue time": ("TritonQueueTimeHigh", "nv_inference_queue_duration_us"),
    "Redis memory": ("RedisMemoryHigh", "redis_memory_used_bytes"),
    "stale pre-compute": ("RecservePrecomputeStale", "kube_cronjob_status_last_successful_time"),
}


@pytest.mark.parametrize("signal", sorted(REQUIRED_ALERTS))
def test_an_alert_watches(signal: str) -> None:
    name, metric = REQUIRED_ALERTS[signal]
    assert metric in metric_names(alert(name)["expr"]), f"{name} must read {metric}"


def test_latency_alert_is_the_objective_on_a_bucket_bound() -> None:
    from orchestrator.metrics import LATENCY_BUCKETS_S

    expr = alert("RecserveLatencyP99AboveObjective")["expr"]
    assert "histogram_quantile(0.99," in expr
    threshold = float(re.search(r">\s*([0-9.]+)\s*$", expr.strip()).group(1))  # type: ignore[union-attr]
    assert threshold == OBJECTIVE_P99_S and OBJECTIVE_P99_S in LATENCY_BUCKETS_S, "the estimate is exact at a bound"


def test_stale_precompute_threshold_follows_the_schedule() -> None:
    """Stale means a run was missed: beyond one period plus a run's longest time, within three periods."""
    cron = find(overlay("gpu-t4"), "CronJob", "recserve-precompute")
    period_h = int(re.fullmatch(r"0 \*/(\d+) \* \* \*", cron["spec"]["schedule"]).group(1))  # type: ignore[union-attr]
    longest_run_h = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] / 3600
    thresholds = {int(h) for h in re.findall(r">\s*(\d+)\s*\*\s*3600", alert("RecservePrecomputeStale")["expr"])}
    (threshold_h,) = thresholds
    assert period_h + longest_run_h < threshold_h < 3 * period_h, (threshold_h, period_h, longest_run_h)
    assert 'cronjob="recserve-precompute"' in alert("RecservePrecomputeStale")["expr"]


def test_every_alert_fires_in_a_promtool_test() -> None:
    tests = read_yaml(PROMTOOL_TEST)["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    silent = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if not case.get("exp_alerts")}
    names = {a["alert"] for a in alerts()}
    assert names <= fired, f"alerts no promtool test fires: {sorted(names - fired)}"
    assert silent, "the promtool tests must also show alerts staying silent on healthy series"


def test_promtool_checks_and_unit_tests_the_rules(tmp_path: Path) -> None:
    binary = promtool()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    shutil.copy(PROMTOOL_TEST, tmp_path / PROMTOOL_TEST.name)
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", PROMTOOL_TEST.name]):
        proc = subprocess.run([binary, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


# ------------------------------------------------------------------------------- prometheus-adapter


def test_adapter_rules_serve_every_custom_metric_an_hpa_reads() -> None:
    served = {rule["name"]["as"]: rule for rule in adapter_rules()}
    needed: set[str] = set()
    for name in OVERLAYS:
        for hpa in of_kind(overlay(name), "HorizontalPodAutoscaler"):
            for metric in hpa["spec"]["metrics"]:
                if metric["type"] in {"Pods", "Object"}:
                    needed.add(metric[metric["type"].lower()]["metric"]["name"])
                elif metric["type"] == "External":
                    needed.add(metric["external"]["metric"]["name"])
    assert needed, "expected the Triton HPA's custom metric"
    assert needed <= set(served), f"HPA metrics without an adapter rule: {sorted(needed - set(served))}"
    for name in needed:
        # Pods metrics are looked up per pod of the HPA's namespace: both labels must map to resources.
        overrides = served[name]["resources"]["overrides"]
        assert overrides["namespace"] == {"resource": "namespace"} and overrides["pod"] == {"resource": "pod"}


def test_adapter_queries_parse(tmp_path: Path) -> None:
    """Each metricsQuery, its template filled in as the adapter would, is valid PromQL."""
    binary = promtool()
    records = []
    for rule in adapter_rules():
        query = (
            rule["metricsQuery"]
            .replace("<<.LabelMatchers>>", 'namespace="recserve",pod=~"triton-.*"')
            .replace("<<.GroupBy>>", "pod")
            .replace("<<.Series>>", metric_names(rule["seriesQuery"]).pop())
        )
        assert "<<" not in query, query
        records.append({"record": f"adapter:{rule['name']['as']}", "expr": query})
    (tmp_path / "adapter.yaml").write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": records}]}))
    proc = subprocess.run(
        [binary, "check", "rules", "adapter.yaml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ dashboard


def test_dashboard_has_redis_triton_gpu_and_fallback_reason_panels() -> None:
    exprs = dashboard_exprs(overlay("gpu-t4"))
    read = [metric_names(e) for e in exprs]
    assert any({"redis_memory_used_bytes", "redis_memory_max_bytes"} <= names for names in read), "Redis memory"
    assert any("redis_up" in names for names in read) and any("redis_commands_processed_total" in n for n in read)
    assert any("nv_gpu_utilization" in names for names in read), "GPU utilization"
    assert any("nv_gpu_memory_used_bytes" in names for names in read), "GPU memory"
    assert any("nv_inference_request_failure" in names for names in read), "Triton rejections"
    share_by_reason = [
        e for e in exprs if "recserve_fallbacks_total" in e and "by (reason)" in e and "recserve_request_latency" in e
    ]
    assert share_by_reason, "a panel with the share of answers per fallback reason"


def test_dashboard_compares_a_canary_with_the_active_version() -> None:
    """docs/RELEASES.md: per version, answers by source, latency, fallback share, top scores and the events that
    quote an answer's request id, each split by version so the two arms sit side by side."""
    exprs = dashboard_exprs(overlay("gpu-t4"))
    for metric in (
        "recserve_version_answers_total",
        "recserve_version_latency_seconds_bucket",
        "recserve_version_top_score_bucket",
        "recserve_attributed_events_total",
    ):
        assert any(metric in e and "version" in e.split(metric)[0] for e in exprs), f"a panel of {metric} by version"
    assert any("recserve_attributed_events_total" in e and "arm" in e for e in exprs), "events per answer by arm"


# ------------------------------------------------------------------------------- names against exports


def test_every_metric_read_is_exported() -> None:
    orchestrator = orchestrator_metrics()
    assert {"recserve_request_latency_seconds_bucket", "recserve_fallbacks_total"} <= set(orchestrator)
    known = set(orchestrator) | TRITON_METRICS | REDIS_EXPORTER_METRICS | KUBE_STATE_METRICS
    unknown = {where: sorted(names - known) for where, names in used_metric_names().items()}
    assert not any(unknown.values()), f"metrics nobody exports: {unknown}"


def test_label_matchers_name_labels_the_orchestrator_metrics_have() -> None:
    """A misspelt label (reason= vs reasons=) matches nothing and silences a rule for good."""
    orchestrator = orchestrator_metrics()
    exprs = [a["expr"] for a in alerts()] + dashboard_exprs(overlay("gpu-t4"))
    bad = []
    for expr in exprs:
        for name, matchers in re.findall(r"\b(recserve_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers):
                if label not in orchestrator[name] and label not in OPERATOR_TARGET_LABELS:
                    bad.append(f"{name}{{{label}}}")
    assert not bad, f"labels the metrics do not have: {bad}"
