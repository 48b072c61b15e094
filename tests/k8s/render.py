"""Rendering kustomizations for the k8s tests: the repository's overlays (each rendered once per session),
and edited copies of k8s/ (what a user's one-line change, or an opted-in component, produces).

Helpers only: no tests here.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("gpu-t4", "cpu-dev")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "CronJob")
# What cpu-dev leaves commented out (its cluster may lack the CRDs); tests render it with them too.
OPTIONAL_COMPONENTS = ("../../components/monitoring", "../../components/gateway")

Obj = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not on PATH: install kubectl (>= 1.27; it embeds kustomize) to render k8s/")
    return found


def render(directory: Path) -> list[Obj]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def _rendered_overlay(name: str) -> tuple[Obj, ...]:
    return tuple(render(K8S / "overlays" / name))


def overlay(name: str) -> list[Obj]:
    """The repository's overlay as it renders (cached: treat the objects as read-only)."""
    return list(_rendered_overlay(name))


def copy_k8s(dest: Path) -> Path:
    """A copy of k8s/ to edit and render; returns the copy's root."""
    return Path(shutil.copytree(K8S, dest / "k8s"))


def enable_optional_components(k8s_root: Path) -> None:
    """Uncomment cpu-dev's optional components (monitoring, gateway) in a copy of k8s/."""
    path = k8s_root / "overlays" / "cpu-dev" / "kustomization.yaml"
    text = path.read_text()
    for component in OPTIONAL_COMPONENTS:
        commented = f"  # - {component}\n"
        assert commented in text, f"expected cpu-dev to list {component} commented out, as {commented!r}"
        text = text.replace(commented, f"  - {component}\n")
    path.write_text(text)


@functools.cache
def _cpu_dev_with_optional_components(tmp_root: str) -> tuple[Obj, ...]:
    root = copy_k8s(Path(tmp_root))
    enable_optional_components(root)
    return tuple(render(root / "overlays" / "cpu-dev"))


def cpu_dev_with_optional_components(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """cpu-dev with the monitoring and gateway components switched on, as docs/DEPLOY.md describes."""
    root = tmp_path_factory.getbasetemp() / "cpu-dev-optional"
    root.mkdir(exist_ok=True)
    return list(_cpu_dev_with_optional_components(str(root)))


# ------------------------------------------------------------------------------------------- objects


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, but found {len(matches)}"
    return matches[0]


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def pod_template(obj: Obj) -> Obj:
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"])
    return dict(obj["spec"]["template"])


def workloads(objects: list[Obj]) -> Iterator[Obj]:
    return (o for o in objects if o["kind"] in WORKLOAD_KINDS)


def containers(obj: Obj) -> list[Obj]:
    spec = pod_template(obj)["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container(obj: Obj, name: str) -> Obj:
    matches = [c for c in containers(obj) if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name!r} in {obj['metadata']['name']}, found {len(matches)}"
    return matches[0]


def image_name(image: str) -> str:
    """registry/repository of an image reference, without tag or digest."""
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


def image_tag(image: str) -> str:
    name = image.split("@", 1)[0]
    _, _, tail = name.rpartition(":")
    return "" if "/" in tail or tail == name else tail


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the evaluator handles matchLabels only, found {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_sources(objects: list[Obj], target: str, port: int) -> set[str]:
    """Workloads (by name) and namespaces ("ns:<name>") that NetworkPolicies let open ``port`` on ``target``."""
    pods = {o["metadata"]["name"]: dict(pod_template(o)["metadata"]["labels"]) for o in workloads(objects)}
    sources: set[str] = set()
    for policy in of_kind(objects, "NetworkPolicy"):
        spec = policy["spec"]
        if "Ingress" not in spec["policyTypes"] or not selects(spec["podSelector"], pods[target]):
            continue
        for rule in spec.get("ingress", []):
            if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
                continue
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer:
                    sources.add("ns:" + peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
                else:
                    sources |= {name for name, labels in pods.items() if selects(peer["podSelector"], labels)}
    return sources


def unknown_keys(obj: Obj, allowed: set[str], where: str) -> list[str]:
    """Keys of ``obj`` outside ``allowed``: a CRD object has no schema here, so a typo would pass silently."""
    return [f"{where}.{key}" for key in obj if key not in allowed]


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dockerfile_images() -> dict[str, Path]:
    """ghcr.io/recserve/<name> for every k8s/docker/<name>.Dockerfile: the first-party images."""
    return {
        f"ghcr.io/recserve/{path.name.removesuffix('.Dockerfile')}": path
        for path in sorted((K8S / "docker").glob("*.Dockerfile"))
    }


SEMVER_TAG = re.compile(r"v?\d+\.\d+\.\d+(-[a-z0-9.]+)?")
