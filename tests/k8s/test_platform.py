"""What a real cluster needs beyond the workloads: one setting for the registry and tag of every
first-party image, Valkey as the datastore (and the way back to Redis), DNS that works whatever serves
it, and an edge that exposes /v1/* only, through the Ingress and the Gateway API route alike.

The HTTPRoute is a CRD object that kubernetes-validate has no schema for: its shape is checked here
field by field (unknown keys fail, as a schema would).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.k8s.render import (
    K8S,
    OVERLAYS,
    REPO,
    SEMVER_TAG,
    Obj,
    container,
    containers,
    copy_k8s,
    cpu_dev_with_optional_components,
    dockerfile_images,
    find,
    image_name,
    image_tag,
    ingress_sources,
    of_kind,
    overlay,
    read_yaml,
    render,
    unknown_keys,
    workloads,
)

DEPLOY_MD = REPO / "docs" / "DEPLOY.md"
IMAGES_COMPONENT = K8S / "components" / "images" / "kustomization.yaml"
# Images we do not build: pinned in k8s/base and the overlays, never retargeted by the images setting.
THIRD_PARTY = {
    "nvcr.io/nvidia/tritonserver",
    "docker.io/valkey/valkey",
    "docker.io/oliver006/redis_exporter",
    "docker.io/amazon/aws-cli",
    "docker.io/minio/minio",
}


@pytest.fixture(params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> list[Obj]:
    return overlay(str(request.param))


def all_images(objects: list[Obj]) -> dict[str, str]:
    """workload/container -> image, for every container of every workload."""
    return {f"{w['metadata']['name']}/{c['name']}": c["image"] for w in workloads(objects) for c in containers(w)}


# ----------------------------------------------------------------------------------------------- images


def test_the_images_setting_names_every_first_party_image() -> None:
    component = read_yaml(IMAGES_COMPONENT)
    assert component["kind"] == "Component"
    entries = {entry["name"]: entry for entry in component["images"]}
    assert set(entries) == set(dockerfile_images()), (
        f"expected one entry per k8s/docker/*.Dockerfile {sorted(dockerfile_images())}, found {sorted(entries)}"
    )
    for name, entry in entries.items():
        assert entry.get("newName") and SEMVER_TAG.fullmatch(str(entry.get("newTag"))), f"{name}: {entry}"
    # One tag for the release: every first-party image is built from the same commit.
    assert len({str(entry["newTag"]) for entry in entries.values()}) == 1


@pytest.mark.parametrize("name", OVERLAYS)
def test_both_overlays_take_the_images_setting(name: str) -> None:
    kustomization = read_yaml(K8S / "overlays" / name / "kustomization.yaml")
    assert "../../components/images" in kustomization.get("components", [])


def test_one_setting_retargets_every_first_party_image(tmp_path: Path) -> None:
    """Point the images setting at another registry and tag: every container not on the third-party list
    follows, in both overlays, and every first-party image is used somewhere."""
    root = copy_k8s(tmp_path)
    path = root / "components" / "images" / "kustomization.yaml"
    component = yaml.safe_load(path.read_text())
    for entry in component["images"]:
        entry["newName"] = "registry.example.net/team/" + entry["name"].rsplit("/", 1)[1]
        entry["newTag"] = "9.9.9-retargeted"
    path.write_text(yaml.safe_dump(component))

    used: set[str] = set()
    stray: list[str] = []
    for name in OVERLAYS:
        for where, image in all_images(render(root / "overlays" / name)).items():
            if image.startswith("registry.example.net/team/"):
                assert image_tag(image) == "9.9.9-retargeted", f"{name} {where}: {image}"
                used.add(image_name(image).rsplit("/", 1)[1])
            elif image_name(image) not in THIRD_PARTY:
                stray.append(f"{name} {where}: {image}")
    assert not stray, f"first-party images the images setting does not cover: {stray}"
    assert used == {image.rsplit("/", 1)[1] for image in dockerfile_images()}, used


def test_first_party_images_carry_the_release_tag(objects: list[Obj]) -> None:
    tags = {entry["name"]: str(entry["newTag"]) for entry in read_yaml(IMAGES_COMPONENT)["images"]}
    for where, image in all_images(objects).items():
        if image_name(image) in tags:
            assert image_tag(image) == tags[image_name(image)], f"{where}: {image}"


def test_deploy_doc_builds_and_pushes_every_image_for_two_architectures() -> None:
    text = DEPLOY_MD.read_text()
    # Shell continuation lines joined: one command per line.
    commands = " ".join(re.findall(r"docker buildx build[^\n]*", text.replace("\\\n", " ")))
    assert commands, "docs/DEPLOY.md: expected docker buildx build commands"
    assert "--platform linux/amd64,linux/arm64" in commands and "--push" in commands, commands
    for image, dockerfile in dockerfile_images().items():
        assert dockerfile.name in text or "k8s/docker/$image.Dockerfile" in commands, dockerfile.name
        assert image.rsplit("/", 1)[1] in text, image
    assert "k8s/components/images/kustomization.yaml" in text, "DEPLOY.md must name the one setting to change"


# ------------------------------------------------------------------------------------------ Redis/Valkey


def test_valkey_is_the_datastore_image(objects: list[Obj]) -> None:
    for kind, name, container_name in (
        ("StatefulSet", "redis-cluster", "redis"),
        ("Job", "redis-cluster-bootstrap", "bootstrap"),
    ):
        c = container(find(objects, kind, name), container_name)
        assert image_name(c["image"]) == "docker.io/valkey/valkey", c["image"]
        assert re.fullmatch(r"8\.\d+\.\d+-\w+", image_tag(c["image"])), f"expected a pinned 8.x tag: {c['image']}"
        # The same scripts run the Valkey image (valkey-*) and Redis's (redis-*): switching back is one line.
        script = c["args"][0]
        assert "command -v valkey-" in script and "|| command -v redis-" in script, script
    probe = container(find(objects, "StatefulSet", "redis-cluster"), "redis")["readinessProbe"]["exec"]["command"]
    assert "valkey-cli || command -v redis-cli" in probe[-1], probe


def test_deploy_doc_says_why_valkey_and_how_to_switch_back() -> None:
    text = DEPLOY_MD.read_text()
    assert "Valkey" in text and "BSD" in text and "RSAL" in text
    assert "newName: docker.io/library/redis" in text


def test_switching_back_to_redis_is_the_documented_line(tmp_path: Path) -> None:
    root = copy_k8s(tmp_path)
    path = root / "base" / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    (entry,) = [e for e in kustomization["images"] if e["name"] == "docker.io/valkey/valkey"]
    entry.update(newName="docker.io/library/redis", newTag="7.4.1-bookworm")
    path.write_text(yaml.safe_dump(kustomization))
    objects = render(root / "overlays" / "gpu-t4")
    for kind, name, c in (("StatefulSet", "redis-cluster", "redis"), ("Job", "redis-cluster-bootstrap", "bootstrap")):
        assert container(find(objects, kind, name), c)["image"] == "docker.io/library/redis:7.4.1-bookworm"


def test_redis_exporter_sidecar_reads_metrics_with_least_privilege(objects: list[Obj]) -> None:
    sts = find(objects, "StatefulSet", "redis-cluster")
    exporter = container(sts, "exporter")
    assert image_name(exporter["image"]) == "docker.io/oliver006/redis_exporter"
    assert SEMVER_TAG.fullmatch(image_tag(exporter["image"])), exporter["image"]
    assert {"name": "metrics", "containerPort": 9121, "protocol": "TCP"} in exporter["ports"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in exporter["env"]}
    assert env["REDIS_ADDR"] == "redis://127.0.0.1:6379" and env["REDIS_USER"] == "exporter"
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "redis-auth", "key": "exporter-password"}}
    assert exporter["resources"]["limits"]["memory"] and exporter["resources"]["limits"]["cpu"]
    # The ACL user it logs in as: no key pattern, no command category, only what the exporter sends.
    script = container(sts, "redis")["args"][0]
    (acl,) = [line.strip() for line in script.splitlines() if line.strip().startswith("user exporter ")]
    rules = acl.split()[3:]
    assert rules[0] == ">${REDIS_EXPORTER_PASSWORD}" and rules[1] == "-@all", acl
    assert all(rule.startswith("+") and "@" not in rule for rule in rules[2:]), acl
    assert not any(rule.startswith(("~", "%", "&")) or rule == "allkeys" for rule in rules), acl
    assert {"+info", "+config|get", "+cluster|info"} <= set(rules), acl


def test_dev_secret_has_every_redis_password() -> None:
    secret = find(overlay("cpu-dev"), "Secret", "redis-auth")
    assert set(secret["data"]) == {"admin-password", "app-password", "exporter-password"}
    assert "exporter-password" in DEPLOY_MD.read_text(), "production creates the secret by hand: DEPLOY.md"


# -------------------------------------------------------------------------------------------------- DNS


def test_dns_egress_does_not_depend_on_who_serves_dns(objects: list[Obj]) -> None:
    """kube-dns pods, NodeLocal DNSCache (a node-local address) and GKE Cloud DNS (the metadata server):
    only a rule on the port, with no peer, admits all three."""
    policy = find(objects, "NetworkPolicy", "allow-dns-egress")
    assert policy["spec"]["podSelector"] == {} and policy["spec"]["policyTypes"] == ["Egress"]
    assert policy["spec"]["egress"] == [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]
    for other in of_kind(objects, "NetworkPolicy"):
        assert "kube-dns" not in yaml.safe_dump(other), f"{other['metadata']['name']} ties DNS to kube-dns labels"


# ------------------------------------------------------------------------------------------------- edge

EDGE_PATH = "/v1"


def test_ingress_exposes_the_public_api_only(objects: list[Obj]) -> None:
    ingress = find(objects, "Ingress", "orchestrator")
    assert "defaultBackend" not in ingress["spec"], "a default backend would expose every other path"
    paths = [path for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert [(p["path"], p["pathType"]) for p in paths] == [(EDGE_PATH, "Prefix")], paths
    assert {p["backend"]["service"]["name"] for p in paths} == {"orchestrator"}


def _routes(objects: list[Obj]) -> list[Obj]:
    return of_kind(objects, "HTTPRoute")


@pytest.fixture(params=["gpu-t4", "cpu-dev+components"])
def with_gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    if request.param == "gpu-t4":
        return overlay("gpu-t4")
    return cpu_dev_with_optional_components(tmp_path_factory)


def test_httproute_shape_and_edge(with_gateway: list[Obj]) -> None:
    (route,) = _routes(with_gateway)
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    bad = unknown_keys(route, {"apiVersion", "kind", "metadata", "spec"}, "HTTPRoute")
    spec = route["spec"]
    bad += unknown_keys(spec, {"parentRefs", "hostnames", "rules"}, "spec")
    (parent,) = spec["parentRefs"]
    bad += unknown_keys(parent, {"group", "kind", "name", "namespace", "sectionName", "port"}, "parentRefs[0]")
    assert parent["group"] == "gateway.networking.k8s.io" and parent["kind"] == "Gateway"
    assert parent["name"] and parent["namespace"], "name the Gateway the cluster runs"
    for i, rule in enumerate(spec["rules"]):
        bad += unknown_keys(rule, {"matches", "backendRefs", "filters", "timeouts"}, f"rules[{i}]")
        for match in rule["matches"]:
            bad += unknown_keys(match, {"path", "headers", "queryParams", "method"}, f"rules[{i}].matches")
            assert match["path"] == {"type": "PathPrefix", "value": EDGE_PATH}, match
        for backend in rule["backendRefs"]:
            bad += unknown_keys(backend, {"group", "kind", "name", "namespace", "port", "weight"}, "backendRefs")
            service = find(with_gateway, "Service", backend["name"])
            assert backend["port"] in {p["port"] for p in service["spec"]["ports"]}, backend
            assert service["spec"]["selector"] == {"app.kubernetes.io/name": "orchestrator"}
    assert not bad, f"fields the Gateway API does not define (no schema checks a CRD here): {bad}"
    # The same host as the Ingress, and the Gateway's namespace may reach the orchestrator (and nothing else).
    ingress = find(with_gateway, "Ingress", "orchestrator")
    assert spec["hostnames"] == [rule["host"] for rule in ingress["spec"]["rules"]]
    assert f"ns:{parent['namespace']}" in ingress_sources(with_gateway, "orchestrator", 8080)
    assert f"ns:{parent['namespace']}" not in ingress_sources(with_gateway, "triton", 8001)


def test_cpu_dev_leaves_the_crd_components_to_the_operator() -> None:
    """A dev cluster without the Prometheus Operator or Gateway API CRDs must apply cleanly."""
    kinds = {o["kind"] for o in overlay("cpu-dev")}
    assert not kinds & {"HTTPRoute", "PodMonitor", "PrometheusRule"}, kinds
    assert {"HTTPRoute", "PodMonitor", "PrometheusRule"} <= {o["kind"] for o in overlay("gpu-t4")}
