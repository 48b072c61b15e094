"""The rules tests/k8s/test_run_manifests.py computes a container's command and environment by, pinned on small
objects (no cluster, no service): a mistake here would run something other than what Kubernetes runs."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.k8s import effective as eff
from tests.k8s.render import dockerfile_images


def image(tmp_path: Path, text: str) -> eff.Image:
    path = tmp_path / "x.Dockerfile"
    path.write_text(text)
    return eff.read_image(path)


def test_command_replaces_the_entrypoint_and_drops_cmd_args_replace_cmd(tmp_path: Path) -> None:
    img = image(tmp_path, 'FROM a AS build\nENTRYPOINT ["no"]\nFROM b\nENTRYPOINT ["ep", "-x"]\nCMD ["c1"]\n')
    assert eff.effective_argv({}, img, {}) == ["ep", "-x", "c1"]
    assert eff.effective_argv({"args": ["a1"]}, img, {}) == ["ep", "-x", "a1"]
    assert eff.effective_argv({"command": ["cmd"]}, img, {}) == ["cmd"]
    assert eff.effective_argv({"command": ["cmd"], "args": ["a1"]}, img, {}) == ["cmd", "a1"]


def test_entrypoint_resets_cmd_and_shell_form_runs_under_sh(tmp_path: Path) -> None:
    img = image(tmp_path, "FROM b\nCMD python3\nENTRYPOINT serve \\\n  --port 1\n")
    assert img.entrypoint == ["/bin/sh", "-c", "serve    --port 1"] and img.cmd == []


def test_variable_expansion_follows_kubernetes() -> None:
    env = {"A": "1", "B": "x y"}
    assert eff.expand("$(A)-$(B)", env) == "1-x y"
    assert eff.expand("$(MISSING)", env) == "$(MISSING)", "an undefined variable stays as written"
    assert eff.expand("$$(A) $$ ${A}", env) == "$(A) $ ${A}", "$$ escapes; ${} is the shell's, not expanded"


def test_env_from_then_env_with_references_to_earlier_variables() -> None:
    secret = {"kind": "Secret", "metadata": {"name": "s"}, "data": {"pw": base64.b64encode(b"p@ss").decode()}}
    config = {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"HOST": "h", "X": "from-config"}}
    sources = eff.Sources([secret, config], {"oob": {"k": "v"}})
    c = {
        "envFrom": [{"configMapRef": {"name": "c"}}, {"secretRef": {"name": "gone", "optional": True}}],
        "env": [
            {"name": "X", "value": "own"},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
            {"name": "URL", "value": "redis://u:$(PW)@$(HOST):1/$(LATER)"},
            {"name": "I", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "K", "valueFrom": {"secretKeyRef": {"name": "oob", "key": "k"}}},
            {"name": "LATER", "value": "z"},
        ],
    }
    env = eff.container_env(c, sources, {"metadata.name": "pod-0"}, "t")
    assert env == {"HOST": "h", "X": "own", "PW": "p@ss", "URL": "redis://u:p@ss@h:1/$(LATER)", "I": "pod-0",
                   "K": "v", "LATER": "z"}  # fmt: skip
    assert sources.used_out_of_band == {"oob"}
    with pytest.raises(AssertionError, match="needs Secret 'nope', but the overlay renders none"):
        eff.container_env({"env": [{"name": "N", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]},
                          sources, {}, "t")  # fmt: skip


def test_cluster_addresses_and_paths_become_local(tmp_path: Path) -> None:
    (tmp_path / "artifacts").mkdir()
    local = {"redis-cluster": "127.0.0.1:7000"}
    url = "redis://u:p@redis-cluster.recserve.svc.cluster.local:6379"
    assert eff.replace_cluster_addresses(url, local, "t") == "redis://u:p@127.0.0.1:7000"
    with pytest.raises(AssertionError, match=r"minio\.recserve\.svc\.cluster\.local:9000 has no local stand-in"):
        eff.replace_cluster_addresses("http://minio.recserve.svc.cluster.local:9000", local, "t")
    assert eff.remap_path("/artifacts/i.faiss", tmp_path) == f"{tmp_path}/artifacts/i.faiss"
    assert eff.remap_path("--out=/artifacts", tmp_path) == f"--out={tmp_path}/artifacts"
    assert eff.remap_path("/usr/bin/x", tmp_path) == "/usr/bin/x", "only what the pod's folder holds"
    argv = eff.local_argv(["uvicorn", "--host", "0.0.0.0", "--port", "8080", "--workers", "8080"], tmp_path, {},
                          {"8080": "5555", "0.0.0.0": "127.0.0.1"}, "t")  # fmt: skip
    assert argv[1:] == ["--host", "127.0.0.1", "--port", "5555", "--workers", "8080"]
    assert argv[0] == str(eff.VENV_BIN / "uvicorn")


def test_a_subpath_mount_shows_one_folder_of_the_volume_the_other_containers_share(tmp_path: Path) -> None:
    pod = {"volumes": [{"name": "models", "emptyDir": {}}]}
    sync = {"volumeMounts": [{"name": "models", "mountPath": "/var/lib/models"}]}
    reader = {"volumeMounts": [{"name": "models", "mountPath": "/models", "subPath": "live", "readOnly": True}]}
    sources = eff.Sources([], {})
    eff.mount_volumes(pod, sync, tmp_path / "sync", tmp_path / "volumes", sources, "t")
    eff.mount_volumes(pod, reader, tmp_path / "reader", tmp_path / "volumes", sources, "t")
    (tmp_path / "sync" / "var" / "lib" / "models" / "live" / "1").mkdir()
    (tmp_path / "sync" / "var" / "lib" / "models" / "staging").mkdir()
    assert sorted(p.name for p in (tmp_path / "reader" / "models").iterdir()) == ["1"]


def test_every_first_party_image_has_an_entrypoint_the_venv_can_run() -> None:
    for name, dockerfile in dockerfile_images().items():
        img = eff.read_image(dockerfile)
        argv = img.entrypoint + img.cmd
        if argv[0] in eff.EXECUTABLES:
            assert eff.EXECUTABLES[argv[0]].exists(), f"{name}: {argv[0]} is not in the venv"
