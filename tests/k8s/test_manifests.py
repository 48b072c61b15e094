"""Offline validation of the Kubernetes deployment (k8s/): both overlays render, every object validates
against the schema of the targeted Kubernetes version, a security policy holds for every pod, and the
properties that make the deployment work at scale are present (GPU limits, probes, the headless
Service with client-side balancing, network policies, the Indexed pre-compute Job, ...).

kustomize renders once per session (module fixture); everything else reads the rendered objects.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from stack.triton_launcher import ADMIN_KEY_PLACEHOLDER
from tests.k8s.render import image_name, ingress_sources, pod_template, workloads

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("gpu-t4", "cpu-dev")
# The Kubernetes version the manifests target (schemas ship inside kubernetes-validate: no network).
K8S_VERSION = "1.31.0"
NAMESPACE = "recserve"
TRITON_RELEASE_TAG = "24.10-py3"  # Triton 2.51.0


Obj = dict[str, Any]


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not on PATH: install kubectl (>= 1.27; it embeds kustomize) to render "
            "k8s/overlays/* and run these checks"
        )
    return kubectl


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    kubectl = _kubectl()
    out: dict[str, list[Obj]] = {}
    for overlay in OVERLAYS:
        proc = subprocess.run(
            [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(rendered: dict[str, list[Obj]], overlay: str) -> list[Obj]:
    return rendered[overlay]


# ---------------------------------------------------------------------------------------------- helpers


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, but found {len(matches)}"
    return matches[0]


def find_generated(objects: list[Obj], kind: str, name: str) -> Obj:
    """A generated ConfigMap/Secret: kustomize appends a content hash to its name."""
    pattern = re.compile(rf"{re.escape(name)}(-[a-z0-9]{{10}})?")
    matches = [o for o in objects if o["kind"] == kind and pattern.fullmatch(o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one generated {kind}/{name}, but found {len(matches)}"
    return matches[0]


def containers(pod: Obj) -> list[Obj]:
    spec = pod["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container(obj: Obj, name: str) -> Obj:
    matches = [c for c in containers(pod_template(obj)) if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name!r} in {obj['metadata']['name']}, found {len(matches)}"
    return matches[0]


def env_value(c: Obj, name: str) -> Any:
    for entry in c.get("env", []):
        if entry["name"] == name:
            return entry.get("value", entry.get("valueFrom"))
    raise AssertionError(f"container {c['name']!r} has no env {name!r}")


def config(objects: list[Obj]) -> dict[str, str]:
    return dict(find_generated(objects, "ConfigMap", "recserve-config")["data"])


def scan_exceptions(obj: Obj) -> dict[str, str]:
    """checkov's inline skips on an object: {check id: reason}."""
    annotations = obj["metadata"].get("annotations", {})
    out: dict[str, str] = {}
    for key, value in annotations.items():
        if key.startswith("checkov.io/skip"):
            check, _, reason = str(value).partition("=")
            out[check] = reason
    return out


# ----------------------------------------------------------------------------------- render + schema


def test_both_overlays_render_with_objects(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objs in rendered.items():
        kinds = {o["kind"] for o in objs}
        missing = {
            "Namespace",
            "Deployment",
            "StatefulSet",
            "Job",
            "CronJob",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "ConfigMap",
            "Ingress",
        } - kinds
        assert not missing, f"overlay {overlay}: expected every kind, but {sorted(missing)} are missing"


# Objects of CRDs (Prometheus Operator, Gateway API): kubernetes-validate ships no schema for them, so
# tests/k8s/test_platform.py checks their shape field by field. Any other kind without a schema fails.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}


def test_every_object_validates_against_the_kubernetes_schema(objects: list[Obj], overlay: str) -> None:
    import kubernetes_validate

    errors = []
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(
                f"{obj['kind']}/{obj['metadata']['name']}: no schema for {obj['apiVersion']} in {K8S_VERSION}"
            )
    assert not errors, f"overlay {overlay}: invalid against Kubernetes {K8S_VERSION}:\n" + "\n".join(errors)


def test_everything_lives_in_the_recserve_namespace(objects: list[Obj]) -> None:
    stray = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in objects
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE
    ]
    assert not stray, f"expected namespace {NAMESPACE!r} on every object, but these have another: {stray}"


def test_service_fqdns_name_the_overlay_namespace(objects: list[Obj]) -> None:
    """The Triton and Redis URLs use FQDNs (no DNS search-path lookups on the hot path); they must
    follow the namespace the overlay deploys into."""
    text = json.dumps(objects)
    namespaces = set(re.findall(r"[a-z0-9-]+\.([a-z0-9-]+)\.svc\.cluster\.local", text))
    assert namespaces == {NAMESPACE}, f"expected FQDNs in namespace {NAMESPACE!r}, but found {namespaces}"


# ------------------------------------------------------------------------------------ images + security


def test_every_image_is_pinned(objects: list[Obj]) -> None:
    bad = []
    for obj in workloads(objects):
        for c in containers(pod_template(obj)):
            image = c["image"]
            name_part = image.split("@")[0].rsplit("/", 1)[-1]
            tag = name_part.partition(":")[2]
            if "@sha256:" not in image and (not tag or tag == "latest"):
                bad.append(f"{obj['metadata']['name']}/{c['name']}: {image}")
    assert not bad, f"expected an exact tag or digest (never :latest or none), but found: {bad}"


def test_triton_is_the_ngc_release_that_serves_our_configs(rendered: dict[str, list[Obj]]) -> None:
    image = container(find(rendered["gpu-t4"], "Deployment", "triton"), "triton")["image"]
    assert image.startswith(f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE_TAG}"), image


# The checks checkov's Kubernetes policies make that matter here, run in-repo so that `make test` needs
# no extra tool (checkov would downgrade packages in the shared venv). An object may skip a check only
# with a checkov.io/skipN annotation stating why: the same inline exceptions checkov itself honours.
DIGEST_CHECK = "CKV_K8S_43"
SECRET_ENV_CHECK = "CKV_K8S_35"


def test_pod_security_policy(objects: list[Obj]) -> None:
    violations: list[str] = []
    for obj in workloads(objects):
        name = obj["metadata"]["name"]
        exceptions = scan_exceptions(obj)
        for check, reason in exceptions.items():
            if len(reason.strip()) < 20:
                violations.append(f"{name}: exception {check} needs a reason, found {reason!r}")
        pod = pod_template(obj)["spec"]
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            violations.append(f"{name}: pod runAsNonRoot must be true")
        if int(psc.get("runAsUser", 0)) < 10000:
            violations.append(
                f"{name}: runAsUser must be >= 10000 (no host uid collision), found {psc.get('runAsUser')}"
            )
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            violations.append(f"{name}: seccompProfile must be RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            violations.append(f"{name}: automountServiceAccountToken must be false (no pod talks to the API)")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                violations.append(f"{name}: {flag} must not be set")
        for volume in pod.get("volumes", []):
            if "hostPath" in volume:
                violations.append(f"{name}: hostPath volume {volume['name']!r} is not allowed")
        for c in containers(pod_template(obj)):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("privileged"):
                violations.append(f"{where}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                violations.append(f"{where}: allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                violations.append(f"{where}: readOnlyRootFilesystem must be true")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                violations.append(f"{where}: capabilities must drop ALL")
            resources = c.get("resources", {})
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(section, {}):
                        violations.append(f"{where}: resources.{section}.{resource} is missing")
            if "@sha256:" not in c["image"] and DIGEST_CHECK not in exceptions:
                violations.append(f"{where}: image {c['image']} has no digest and no {DIGEST_CHECK} exception")
            secret_env = [e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
            secret_env += [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            if secret_env and SECRET_ENV_CHECK not in exceptions:
                violations.append(f"{where}: secrets as env {secret_env} without a {SECRET_ENV_CHECK} exception")
    assert not violations, "security policy violations:\n" + "\n".join(violations)


def test_checkov_finds_nothing_unjustified(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    """Runs the real scanner where it is installed (a separate tool venv; see docs/DEPLOY.md)."""
    checkov = shutil.which("checkov") or next(
        (str(p) for p in (REPO / "build" / "tools" / "bin" / "checkov",) if p.exists()), None
    )
    if checkov is None:
        pytest.skip(
            "checkov is not installed (the in-repo policy test covers its pod checks); to run it: "
            "python3.11 -m venv build/tools && build/tools/bin/pip install checkov==3.3.30"
        )
    for overlay, objs in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objs))
    proc = subprocess.run(
        [checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--compact", "--quiet", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for report in reports
        for c in report.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "checkov findings without an inline justification:\n" + "\n".join(failed)


# ---------------------------------------------------------------------------------------------- Triton


def test_triton_gpu_placement(rendered: dict[str, list[Obj]]) -> None:
    triton = find(rendered["gpu-t4"], "Deployment", "triton")
    spec = pod_template(triton)["spec"]
    c = container(triton, "triton")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "Tesla-T4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]

    dev = container(find(rendered["cpu-dev"], "Deployment", "triton"), "triton")
    assert "nvidia.com/gpu" not in dev["resources"].get("limits", {}), "cpu-dev must schedule without GPUs"


def test_triton_probes_metrics_and_termination(objects: list[Obj]) -> None:
    triton = find(objects, "Deployment", "triton")
    c = container(triton, "triton")
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    annotations = pod_template(triton)["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"

    # SIGTERM arrives after preStop; the grace period must cover the delay and Triton's own drain.
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    exit_timeout = int(next(a for a in c["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    grace = pod_template(triton)["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + exit_timeout, f"grace {grace}s must exceed preStop {pre_stop}s + drain {exit_timeout}s"


def test_triton_admin_apis_are_closed(objects: list[Obj]) -> None:
    c = container(find(objects, "Deployment", "triton"), "triton")
    args = c["args"]
    # Poll mode loads and unloads what appears in the repository; the load/unload API is explicit mode's only.
    assert "--model-control-mode=poll" in args
    for flag in ("--grpc-restricted-protocol=", "--http-restricted-api="):
        value = next(a for a in args if a.startswith(flag)).removeprefix(flag)
        apis, _, key = value.partition(":")
        assert {"model-repository", "shared-memory", "statistics", "trace", "logging"} <= set(apis.split(","))
        assert "inference" not in apis.split(","), "inference must stay open to the orchestrator"
        assert key == f"admin-key={ADMIN_KEY_PLACEHOLDER}", key
    assert env_value(c, "TRITON_ADMIN_KEY") == {"secretKeyRef": {"name": "triton-admin", "key": "admin-key"}}


def test_triton_admin_key_stays_off_its_command_line(objects: list[Obj], tmp_path: Path) -> None:
    """The rendered Deployment preloads the shim an init container copies from the orchestrator image, whose
    Dockerfile compiles stack/argv_secret.c; run that very compile line and the rendered arguments and
    environment, with python3 standing in for tritonserver: main() sees the key, the process list does not."""
    triton = find(objects, "Deployment", "triton")
    c = container(triton, "triton")
    assert not [a for a in c["args"] if "$(TRITON_ADMIN_KEY)" in a], "the key must not be expanded into argv"
    preload = env_value(c, "LD_PRELOAD")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    shim_dir = str(Path(preload).parent)
    assert mounts[shim_dir].get("readOnly") is True, "Triton must not be able to replace its own shim"
    volume = next(v for v in pod_template(triton)["spec"]["volumes"] if v["name"] == mounts[shim_dir]["name"])
    assert "emptyDir" in volume, volume
    installs = [
        i
        for i in pod_template(triton)["spec"].get("initContainers", [])
        if any(m["name"] == volume["name"] for m in i.get("volumeMounts", []))
    ]
    assert len(installs) == 1, f"expected one init container filling {volume['name']}, found {installs}"
    install = installs[0]
    assert image_name(install["image"]) == "ghcr.io/recserve/orchestrator"
    source, target = install["command"][-2:]
    assert install["command"][0] == "cp" and target == f"{shim_dir}/{Path(preload).name}", install["command"]

    dockerfile = (K8S / "docker" / "orchestrator.Dockerfile").read_text()
    assert f"/src/argv_secret.so {source}" in dockerfile, f"the orchestrator image must hold {source}"
    compile_line = next(line for line in dockerfile.splitlines() if "gcc" in line and "argv_secret.c" in line)
    assert "COPY stack/argv_secret.c /src/argv_secret.c" in dockerfile
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("no gcc to compile stack/argv_secret.c as the orchestrator image does")
    command = compile_line.removeprefix("RUN ").replace("/src/argv_secret.c", str(REPO / "stack" / "argv_secret.c"))
    command = command.replace("/src/argv_secret.so", str(tmp_path / "argv_secret.so"))
    subprocess.run(command, shell=True, check=True, timeout=60)

    key = "k8s-test-admin-key-0123456789abcdef"
    probe = (
        "import json, sys; cmdline = open('/proc/self/cmdline', 'rb').read().decode();"
        "print(json.dumps({'argv': sys.argv[1:], 'cmdline': cmdline}))"
    )
    env = {"PATH": "/usr/bin:/bin", "TRITON_ADMIN_KEY": key, "LD_PRELOAD": str(tmp_path / "argv_secret.so")}
    seen = json.loads(
        subprocess.run(
            ["python3", "-c", probe, *c["args"]], env=env, capture_output=True, text=True, timeout=30, check=True
        ).stdout
    )
    filled = [a for a in seen["argv"] if a.endswith(f"admin-key={key}")]
    assert len(filled) == 2, seen["argv"]
    assert key not in seen["cmdline"] and seen["cmdline"].count(ADMIN_KEY_PLACEHOLDER) == 2
    # Fails closed: without the key the placeholder (public) must not become the key.
    del env["TRITON_ADMIN_KEY"]
    refused = subprocess.run(["python3", "-c", probe, *c["args"]], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "TRITON_ADMIN_KEY is not set" in refused.stderr


def test_triton_model_repository_comes_from_object_storage(objects: list[Obj], overlay: str) -> None:
    triton = find(objects, "Deployment", "triton")
    fetch = container(triton, "fetch-model-repository")
    assert "artifact-sync.sh sync" in fetch["args"][0]
    assert '"${ARTIFACT_URI}/model_repository/${MODEL_REPOSITORY_PROFILE}/"' in fetch["args"][0]
    assert "--model-repository=/models" in container(triton, "triton")["args"]
    cfg = config(objects)
    assert cfg["ARTIFACT_URI"].startswith("s3://")
    assert cfg["MODEL_REPOSITORY_PROFILE"] == {"gpu-t4": "gpu-t4", "cpu-dev": "cpu"}[overlay]


def test_trt_engine_cache_volume_matches_the_model_config(rendered: dict[str, list[Obj]]) -> None:
    from export.triton_config import build_config, ranker_models

    onnx = next(m for m in ranker_models() if m.runtime == "onnxruntime")
    trt = build_config(onnx, "gpu-t4").optimization.execution_accelerators.gpu_execution_accelerator[0]
    cache_path = trt.parameters["trt_engine_cache_path"]
    triton = find(rendered["gpu-t4"], "Deployment", "triton")
    mounts = {m["mountPath"]: m for m in container(triton, "triton")["volumeMounts"]}
    assert cache_path in mounts, f"expected a volume at {cache_path} (config.pbtxt), found {sorted(mounts)}"
    # Per-node subdirectory: concurrent pods never write the same engine file.
    assert mounts[cache_path]["subPathExpr"] == "$(NODE_NAME)"
    volumes = {v["name"]: v for v in pod_template(triton)["spec"]["volumes"]}
    claim = volumes[mounts[cache_path]["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = find(rendered["gpu-t4"], "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_cpu_dev_sizes_dev_shm_for_the_python_backend(rendered: dict[str, list[Obj]]) -> None:
    triton = find(rendered["cpu-dev"], "Deployment", "triton")
    mounts = {m["mountPath"]: m["name"] for m in container(triton, "triton")["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_template(triton)["spec"]["volumes"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"] == "1Gi"


# ---------------------------------------------------------------------- orchestrator + gRPC balancing


def test_triton_headless_service_and_client_side_round_robin(objects: list[Obj]) -> None:
    svc = find(objects, "Service", "triton-headless")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "triton"}
    assert {"name": "grpc", "port": 8001, "targetPort": "grpc", "protocol": "TCP"} in svc["spec"]["ports"]
    cfg = config(objects)
    assert cfg["RECSERVE_TRITON_URL"] == f"dns:///triton-headless.{NAMESPACE}.svc.cluster.local:8001"
    assert 0 < int(cfg["RECSERVE_TRITON_MAX_CONNECTION_AGE_S"]) <= 300


def test_orchestrator_deployment(objects: list[Obj]) -> None:
    orch = find(objects, "Deployment", "orchestrator")
    assert "replicas" not in orch["spec"], "the HPA owns the replica count; a re-apply must not reset it"
    c = container(orch, "orchestrator")
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod_template(orch)["spec"]["securityContext"]["runAsNonRoot"] is True
    # The generated name carries a content hash: a settings change rolls the pods.
    generated = find_generated(objects, "ConfigMap", "recserve-config")["metadata"]["name"]
    assert {"configMapRef": {"name": generated}} in c["envFrom"]
    # The password comes from the Secret into a setting that is never logged, not into the URL.
    assert env_value(c, "RECSERVE_REDIS_PASSWORD") == {"secretKeyRef": {"name": "redis-auth", "key": "app-password"}}
    assert env_value(c, "RECSERVE_REDIS_USERNAME") == "recserve"
    assert "@" not in env_value(c, "RECSERVE_REDIS_URLS")
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert config(objects)["RECSERVE_INDEX_PATH"].startswith("/artifacts/")


def test_hpa_and_pdbs(objects: list[Obj], overlay: str) -> None:
    hpa = find(objects, "HorizontalPodAutoscaler", "orchestrator")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "orchestrator",
    }
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    for name, selected in (
        ("orchestrator", "orchestrator"),
        ("triton", "triton"),
        ("redis-cluster", "redis-cluster"),
    ):
        pdb = find(objects, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": selected}
    if overlay == "gpu-t4":
        triton_hpa = find(objects, "HorizontalPodAutoscaler", "triton")
        assert triton_hpa["spec"]["minReplicas"] == 8, "the reference plan's 8 T4s, kept until a T4 is measured"
        assert "replicas" not in find(objects, "Deployment", "triton")["spec"]


# ------------------------------------------------------------------------------------------------ Redis


def test_redis_cluster_topology_and_auth(objects: list[Obj], overlay: str) -> None:
    sts = find(objects, "StatefulSet", "redis-cluster")
    assert sts["spec"]["replicas"] == 6
    assert sts["spec"]["serviceName"] == "redis-cluster-headless"
    script = container(find(objects, "Job", "redis-cluster-bootstrap"), "bootstrap")["args"][0]
    assert "NODES=6" in script and "--cluster-replicas 1" in script, "6 nodes = 3 masters + 3 replicas"
    anti = pod_template(sts)["spec"]["affinity"]["podAntiAffinity"]
    required = "requiredDuringSchedulingIgnoredDuringExecution"
    # Production requires one node per host; a dev cluster may have a single node.
    assert (required in anti) == (overlay == "gpu-t4"), anti
    redis = container(sts, "redis")
    assert env_value(redis, "REDIS_ADMIN_PASSWORD")["secretKeyRef"]["name"] == "redis-auth"
    assert env_value(redis, "REDIS_APP_PASSWORD")["secretKeyRef"]["name"] == "redis-auth"
    assert "user default off" in redis["args"][0]
    headless = find(objects, "Service", "redis-cluster-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True


def test_redis_persistence_policy_is_stated(objects: list[Obj]) -> None:
    conf = find_generated(objects, "ConfigMap", "redis-config")["data"]["redis.conf"]
    # Accepted events live in the `events` stream: AOF, fsynced every second (docs/RELIABILITY.md).
    assert re.search(r"^appendonly yes$", conf, re.M) and re.search(r"^appendfsync everysec$", conf, re.M)
    assert re.search(r"^save \d+ \d+", conf, re.M), "RDB snapshots: a restarted master must not come back empty"
    assert re.search(r"^maxmemory-policy volatile-lru$", conf, re.M), "evict TTL'd cache keys, never embeddings"
    assert "Persistence policy" in conf


# ------------------------------------------------------------------------------------------------- Jobs


def test_offline_jobs(objects: list[Obj]) -> None:
    export = find(objects, "Job", "recserve-export")
    assert "python -m export all" in container(export, "export")["args"][0]
    assert "READY" in container(export, "publish")["args"][0]
    load = find(objects, "Job", "recserve-load")
    assert container(load, "load")["args"][0] == "load"


def test_precompute_is_an_indexed_job_every_6_hours(objects: list[Obj]) -> None:
    cron = find(objects, "CronJob", "recserve-precompute")
    assert cron["spec"]["schedule"] == "0 */6 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed"
    c = container(cron, "precompute")
    shard_count = int(env_value(c, "SHARD_COUNT"))
    assert job["completions"] == shard_count, (
        f"completions ({job['completions']}) must equal SHARD_COUNT ({shard_count}) or shards go missing"
    )
    index_from = env_value(c, "SHARD_INDEX")["fieldRef"]["fieldPath"]
    assert index_from == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    args = c["args"]
    assert args[args.index("--shard-count") + 1] == "$(SHARD_COUNT)"
    assert args[args.index("--shard-index") + 1] == "$(SHARD_INDEX)"


# ------------------------------------------------------------------------------------ network policies


def test_default_deny(objects: list[Obj]) -> None:
    deny = find(objects, "NetworkPolicy", "default-deny-all")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_only_the_orchestrator_reaches_triton(objects: list[Obj]) -> None:
    assert ingress_sources(objects, "triton", 8001) == {"orchestrator"}
    assert ingress_sources(objects, "triton", 8002) == {"ns:monitoring"}


def test_only_the_orchestrator_and_data_jobs_reach_redis(objects: list[Obj]) -> None:
    # The load, pre-compute and release Jobs write what the orchestrator reads; the bootstrap Job forms the cluster.
    assert ingress_sources(objects, "redis-cluster", 6379) == {
        "orchestrator",
        "recserve-load",
        "recserve-precompute",
        "recserve-release",
        "redis-cluster-bootstrap",
        "redis-cluster",
    }
    assert ingress_sources(objects, "redis-cluster", 16379) == {"redis-cluster"}


def test_only_the_ingress_reaches_the_orchestrator(objects: list[Obj]) -> None:
    # The edge: the ingress controller's namespace or the Gateway's (k8s/base/network/policies.yaml).
    assert ingress_sources(objects, "orchestrator", 8080) == {"ns:ingress-nginx", "ns:gateway-system", "ns:monitoring"}


# ---------------------------------------------------------------- model versions reach running pods

SYNC_SCRIPT = K8S / "base" / "sync" / "artifact-sync.sh"
# (Deployment, its sync container, the init container that runs the first round, the reader, its mount path)
SYNCED = [
    ("triton", "sync-model-repository", "fetch-model-repository", "triton", "/models"),
    ("orchestrator", "sync-index", "fetch-index", "orchestrator", "/artifacts"),
]


def script_path(deployment: Obj, c: Obj) -> str:
    """Where ``c`` mounts the artifact-sync ConfigMap's script (read-only, executable)."""
    volumes = {v["name"]: v for v in pod_template(deployment)["spec"]["volumes"]}
    for mount in c.get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap", {})
        if re.fullmatch(r"artifact-sync(-[a-z0-9]{10})?", source.get("name", "")):
            assert mount.get("readOnly") is True and source.get("defaultMode") == 0o555, (mount, source)
            return f"{mount['mountPath']}/{SYNC_SCRIPT.name}"
    raise AssertionError(f"{c['name']} does not mount the artifact-sync ConfigMap")


def test_the_sync_script_ships_as_a_configmap(objects: list[Obj]) -> None:
    script = find_generated(objects, "ConfigMap", "artifact-sync")
    assert script["data"] == {SYNC_SCRIPT.name: SYNC_SCRIPT.read_text()}


@pytest.mark.parametrize(("workload", "sidecar", "init", "reader", "reader_path"), SYNCED)
def test_a_sync_sidecar_keeps_the_folder_a_deployment_reads_in_step_with_object_storage(
    objects: list[Obj], workload: str, sidecar: str, init: str, reader: str, reader_path: str
) -> None:
    deployment = find(objects, "Deployment", workload)
    spec = pod_template(deployment)["spec"]
    side = container(deployment, sidecar)
    assert side in spec["containers"], f"{sidecar} must run beside {reader} for the pod's life, not once"
    script = script_path(deployment, side)
    assert side["command"] == ["/bin/sh", script]
    mode, source, staging, live, every_s, *extra = side["args"]
    assert (mode, every_s) == ("sync", "15"), side["args"]
    assert source.startswith("$(ARTIFACT_URI)/"), source

    # STAGING and LIVE on one emptyDir; the reader sees LIVE only, read-only, at the path it always read.
    mounts = {m["name"]: m for m in side["volumeMounts"]}
    volume = next(name for name, m in mounts.items() if live.startswith(m["mountPath"] + "/"))
    root = mounts[volume]["mountPath"]
    assert (staging.rsplit("/", 1)[0], live.rsplit("/", 1)[0]) == (root, root), (staging, live)
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == volume)
    read = next(m for m in container(deployment, reader)["volumeMounts"] if m["mountPath"] == reader_path)
    assert read == {"name": volume, "mountPath": reader_path, "subPath": live.rsplit("/", 1)[1], "readOnly": True}

    # The init container runs one round of the same sync into the same folders before the reader starts.
    first = container(deployment, init)
    assert first in spec["initContainers"] and first["command"] == ["/bin/sh", "-ec"]
    assert script_path(deployment, first) == script
    assert {m["name"]: m["mountPath"] for m in first["volumeMounts"]}[volume] == root
    joined = re.sub(r"\\\n\s*", " ", first["args"][0])  # continued lines joined
    line = next((line for line in joined.splitlines() if f"{script} sync" in line), None)
    assert line is not None, f"{init} must run `/bin/sh {script} sync ...`, found:\n{first['args'][0]}"
    # Kubernetes expands $(VAR) in args, the shell ${VAR}: the same source either way.
    expected = [re.sub(r"\$\((\w+)\)", r"${\1}", source), staging, live, *extra]
    assert shlex.split(line.strip())[3:] == expected, line
    for c in (first, side):
        assert {"name": "artifact-store", "optional": True} in [e.get("secretRef") for e in c.get("envFrom", [])]
        assert c["image"].startswith("docker.io/amazon/aws-cli:"), c["image"]
    # The sync containers share the pod's labels: the object-storage egress policy covers them too.
    assert pod_template(deployment)["metadata"]["labels"]["recserve.io/object-storage"] == "true"


@pytest.mark.parametrize(("workload", "sidecar"), [(w, s) for w, s, *_ in SYNCED])
def test_the_sync_liveness_probe_fails_on_a_stuck_round_only(
    objects: list[Obj], workload: str, sidecar: str, tmp_path: Path
) -> None:
    """The probe's own command, run here on a heartbeat file that the loop would have touched (or not)."""
    import os
    import time

    side = container(find(objects, "Deployment", workload), sidecar)
    heartbeat = env_value(side, "ARTIFACT_SYNC_HEARTBEAT")
    command = side["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"] and heartbeat in command[2]
    local = tmp_path / "round"
    probe = [*command[:2], command[2].replace(heartbeat, str(local))]
    local.touch()
    assert subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    stuck = time.time() - 3600
    os.utime(local, (stuck, stuck))
    assert subprocess.run(probe, capture_output=True, timeout=10).returncode != 0
    assert side["livenessProbe"]["periodSeconds"] * side["livenessProbe"]["failureThreshold"] >= 60
    assert "readinessProbe" not in side, "a sync container's readiness would gate the serving pod's"


def test_triton_polls_the_synced_repository_and_no_container_fixes_its_models(objects: list[Obj]) -> None:
    args = container(find(objects, "Deployment", "triton"), "triton")["args"]
    assert "--model-control-mode=poll" in args and "--model-repository=/models" in args
    # Strict readiness reports a pod unready while any version loads: every pod at once, at each release.
    assert "--strict-readiness=false" in args and "--exit-on-error=true" in args
    poll_s = int(next(a for a in args if a.startswith("--repository-poll-secs=")).split("=")[1])
    assert 1 <= poll_s <= 15, f"a version must be served within ~30 s of its upload, but Triton looks every {poll_s} s"
    fixed = [
        f"{w['metadata']['name']}/{c['name']}"
        for w in workloads(objects)
        for c in containers(pod_template(w))
        if any("--model-control-mode=none" in a for a in c.get("command", []) + c.get("args", []))
    ]
    assert not fixed, f"expected no container to load its models once at start, but found {fixed}"


def test_the_index_path_lies_in_the_synced_folder(objects: list[Obj]) -> None:
    assert config(objects)["RECSERVE_INDEX_PATH"] == "/artifacts/v{version}/item_index.faiss"


def test_precompute_refreshes_the_active_version(objects: list[Obj]) -> None:
    args = container(find(objects, "CronJob", "recserve-precompute"), "precompute")["args"]
    assert args[args.index("--version") + 1] == "active"


RELEASE_REDIS_URL = "redis://recserve:pw@redis-cluster.recserve.svc.cluster.local:6379"


def run_release_script(c: Obj, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The release container's script under /bin/sh, with a ``python`` that writes its arguments to a file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "python"
    stub.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGV_FILE"\n')
    stub.chmod(0o755)
    base = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "ARGV_FILE": str(tmp_path / "argv"),
        "RECSERVE_DATASET": "synthetic",
        "RECSERVE_REDIS_URLS": RELEASE_REDIS_URL,
        "RECSERVE_REDIS_MODE": "cluster",
    }
    assert c["command"] == ["/bin/sh", "-ec"], c["command"]
    return subprocess.run(
        ["/bin/sh", "-ec", c["args"][0]], env=base | env, capture_output=True, text=True, timeout=30, check=False
    )


def test_the_release_job_runs_each_command_against_every_triton_pod(
    objects: list[Obj], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release container's script, run with each RELEASE_COMMAND, passes arguments export's own parser
    takes: the cluster's Redis (from the environment: its password stays off the command line), and
    Triton's headless Service, whose every address `publish` asks."""
    from export.__main__ import build_parser

    # What the container's environment holds (recserve-config, the redis-auth Secret), read by the parser.
    monkeypatch.setenv("RECSERVE_REDIS_URLS", RELEASE_REDIS_URL)
    monkeypatch.setenv("RECSERVE_REDIS_MODE", "cluster")
    cron = find(objects, "CronJob", "recserve-release")
    assert cron["spec"]["suspend"] is True, "a template for `kubectl create job --from`, never scheduled"
    release = container(cron, "release")
    service = find(objects, "Service", "triton-headless")
    assert service["spec"]["clusterIP"] == "None", "one address per ready pod"
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    triton_http = f"http://triton-headless.{NAMESPACE}.svc.cluster.local:{http['port']}"
    parser = build_parser()
    for env, command, version in (
        ({"RELEASE_COMMAND": "publish", "RELEASE_VERSION": "2", "RELEASE_OPTIONS": "--canary 10"}, "publish", 2),
        ({"RELEASE_COMMAND": "retire", "RELEASE_VERSION": "1"}, "retire", 1),
        ({"RELEASE_COMMAND": "rollback"}, "rollback", None),
    ):
        done = run_release_script(release, tmp_path, **env)
        assert done.returncode == 0, done.stderr
        argv = (tmp_path / "argv").read_text().splitlines()
        assert argv[:2] == ["-m", "export"], argv
        assert not any("pw" in arg for arg in argv), f"the Redis password is on the command line: {argv}"
        args = parser.parse_args(argv[2:])
        assert (args.command, getattr(args, "version", None)) == (command, version), argv
        assert args.cluster and args.redis == RELEASE_REDIS_URL and args.triton_http == triton_http, argv
        if command != "rollback":
            assert (args.dataset, args.build_dir, args.repo) == ("synthetic", "/app/build", "/app/model_repository")
        if command == "publish":
            assert args.canary == 10, argv
    wrong = run_release_script(release, tmp_path, RELEASE_COMMAND="promote")
    assert wrong.returncode == 2 and "expected RELEASE_COMMAND publish, rollback or retire" in wrong.stderr
    assert ingress_sources(objects, "triton", 8000) == {"recserve-release"}


# ------------------------------------------------------------------------------------------ dashboard

RECSERVE_METRICS = {
    "recserve_request_latency_seconds",
    "recserve_stage_latency_seconds",
    "recserve_cache_hits_total",
    "recserve_cache_misses_total",
    "recserve_fallbacks_total",
    "recserve_ranker_errors_total",
    # The model-versions row (docs/RELEASES.md): a canary against the active version.
    "recserve_version_answers_total",
    "recserve_version_latency_seconds",
    "recserve_version_top_score_bucket",
    "recserve_attributed_events_total",
}
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_exec_count",
    "nv_inference_count",
    "nv_inference_pending_request_count",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_memory_total_bytes",
}


def test_grafana_dashboard_covers_our_metrics_and_tritons(objects: list[Obj]) -> None:
    cm = find(objects, "ConfigMap", "recserve-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["recserve-dashboard.json"])
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]  # rows have none
    names = {m for e in exprs for m in re.findall(r"\b(?:recserve|nv)_[a-z_]+", e)}
    # A histogram is queried through its _bucket/_count/_sum series.
    used = {re.sub(r"(_seconds)_(bucket|count|sum)$", r"\1", n) for n in names}
    unknown = used - RECSERVE_METRICS - TRITON_METRICS
    assert not unknown, f"dashboard queries metrics nobody exports: {sorted(unknown)}"
    missing = (RECSERVE_METRICS | TRITON_METRICS) - used
    assert not missing, f"dashboard misses metrics: {sorted(missing)}"


# ---------------------------------------------------------------------------------------- Dockerfiles


def _dockerfile(name: str) -> str:
    return (K8S / "docker" / f"{name}.Dockerfile").read_text()


@pytest.mark.parametrize("name", ["orchestrator", "jobs", "triton-cpu"])
def test_dockerfiles_pin_the_base_and_run_as_non_root(name: str) -> None:
    text = _dockerfile(name)
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base is not None, f"{name}: expected ARG PYTHON_IMAGE=<pinned base>"
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1)), base.group(1)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] == "10001:10001", f"{name}: the final USER must be 10001, found {users}"


def test_online_image_has_no_torch_and_jobs_image_has_the_export_extra() -> None:
    online = _dockerfile("orchestrator")
    assert ".[export" not in online and 'pip install -c constraints.txt ".[telemetry]"' in online
    assert '".[export]"' in _dockerfile("jobs")


def test_online_image_entrypoint_names_an_app_that_exists() -> None:
    """uvicorn must find what the ENTRYPOINT names: an ASGI app, or with --factory a callable that builds one."""
    import importlib
    import json

    found = re.search(r"^ENTRYPOINT (\[.*?\])$", _dockerfile("orchestrator"), re.M | re.S)
    assert found is not None, "orchestrator.Dockerfile: expected an exec-form ENTRYPOINT"
    argv = json.loads(found.group(1).replace("\\\n", " "))
    assert argv[0] == "uvicorn", argv
    targets = [a for a in argv[1:] if re.fullmatch(r"[\w.]+:\w+", a)]
    assert len(targets) == 1, f"expected one module:attribute target in {argv}"
    module_name, attribute = targets[0].split(":")
    target = getattr(importlib.import_module(module_name), attribute, None)
    assert target is not None, f"{module_name} has no attribute {attribute!r}: every pod would crash-loop"
    if "--factory" in argv:
        from fastapi import FastAPI

        assert callable(target) and isinstance(target(), FastAPI), f"{targets[0]} must build a FastAPI app"


# Variables the offline CLI reads itself (not orchestrator settings).
CLI_ONLY_VARIABLES = {"RECSERVE_DATASET", "RECSERVE_MOVIELENS_DIR"}


def test_every_recserve_variable_is_a_setting_the_code_reads(objects: list[Obj]) -> None:
    """The manifests and the Settings class must not drift apart: a misspelt variable is silently ignored.
    The benchmarks' ablation switches (RECSERVE_ABLATION_*) are not production settings: unknown here too."""
    from orchestrator.config import Settings, environment_variables

    known = {name for name, _ in environment_variables(Settings)} | CLI_ONLY_VARIABLES
    named = set(config(objects))
    for workload in workloads(objects):
        for c in containers(pod_template(workload)):
            named |= {e["name"] for e in c.get("env", [])}
    recserve = {name for name in named if name.startswith("RECSERVE_")}
    assert recserve, "no RECSERVE_* settings found in the manifests"
    assert recserve <= known, f"unknown settings: {sorted(recserve - known)}"
    assert config(objects)["RECSERVE_REDIS_MODE"] == "cluster"
