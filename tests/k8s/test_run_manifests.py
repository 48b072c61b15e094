"""Run what the manifests run: each first-party container of both overlays, with its effective command and
environment as Kubernetes would compute them from the rendered objects, as a local process against the test
stack's real Redis and Triton.

What stands in for the cluster, and why it is the closest honest check without one:
- The images: there is no Docker here. Each image's ENTRYPOINT/CMD is read from its k8s/docker/*.Dockerfile and
  run from the venv (``python``, ``uvicorn`` -> .venv/bin/...); the files the image COPYs (minus its
  .dockerignore) are copied to the pod's folder, its WORKDIR is the process's folder. So "the orchestrator image
  starts" means: the image's ENTRYPOINT, as the Deployment leaves it, serves from the venv; not that the image
  builds (a missing system library would not show here).
- The pod's filesystem: a folder per container, volumes linked in at their mount paths (Secret volumes written
  from the rendered or out-of-band Secret), absolute in-container paths in argv and env remapped under it.
- Object storage: the aws-cli init containers' ``aws s3 sync`` lines are replayed (with their include/exclude
  filters) from the test's exported bundle, which is what the export Job publishes; a round of
  k8s/base/sync/artifact-sync.sh is that replay into its STAGING folder, then the script's own ``promote``.
- Redis: the manifests run Redis Cluster with ACL users; the test starts a 3-master cluster with the stack's
  launcher (stack.redis_local) and creates the users from the StatefulSet's own ``user`` lines (passwords from
  the redis-auth Secret, the default user off), so a command the ACL forbids the service would fail here too.
  The `stack` fixture's standalone, ACL-less Redis could not show either.
- Triton: the session's real tritonserver (`triton` fixture, cpu profile of the exported model).
- Cluster addresses (``<service>.<namespace>.svc.cluster.local``) are replaced by those stand-ins; every other
  setting is the overlay's, the 80 ms request deadline included.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from stack.launch import free_port
from tests.conftest import TEST_API_KEY, Exported
from tests.k8s import effective as eff
from tests.k8s.render import (
    OVERLAYS,
    REPO,
    Obj,
    container,
    containers,
    dockerfile_images,
    find,
    image_name,
    overlay,
    pod_template,
    workloads,
)
from tests.redis_harness import LocalCluster, require_redis, start_cluster
from tests.waiting import poll

pytestmark = pytest.mark.integration

# (kind, workload, container) of every first-party container: run here, or the reason it is not.
RUN = {
    ("Job", "recserve-load", "load"): "exits 0",
    ("CronJob", "recserve-precompute", "precompute"): "exits 0 (the first and the last shard)",
    ("Deployment", "orchestrator", "orchestrator"): "answers its readiness probe and a recommendation",
}
NOT_RUN = {
    ("Job", "recserve-export", "export"): "trains and exports: the `exported` fixture runs the same pipeline",
    ("Job", "recserve-export", "stage-model-repository"): "a `cp` of the image's model_repository/ to a volume",
    ("Deployment", "triton", "install-admin-key-shim"): (
        "a `cp` of the image's argv_secret.so to a volume; tests/k8s/test_manifests.py compiles it as the image"
        " does and runs the Deployment's arguments through it"
    ),
    ("Deployment", "triton", "triton"): "tritonserver on the cpu profile: the `triton` fixture runs it",
    ("CronJob", "recserve-release", "release"): (
        "publish, rollback and retire against a real Redis and Triton: tests/integration/test_releases.py runs the"
        " same commands; tests/k8s/test_manifests.py runs this container's script and parses what it passes"
    ),
}
AWS_CLI = "docker.io/amazon/aws-cli"
# Created out of band in production (docs/DEPLOY.md), so gpu-t4 renders none: the test creates its own.
OUT_OF_BAND_SECRETS = {
    "redis-auth": {k: secrets.token_hex(32) for k in ("admin-password", "app-password", "exporter-password")},
    "recserve-api-keys": {"tests": TEST_API_KEY},
    "triton-admin": {"admin-key": secrets.token_hex(32)},
}
READY_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 90.0


def first_party(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    images = set(dockerfile_images())
    for workload in workloads(objects):
        for c in containers(workload):
            if image_name(c["image"]) in images:
                yield workload, c


def key(workload: Obj, c: Obj) -> tuple[str, str, str]:
    return workload["kind"], workload["metadata"]["name"], c["name"]


def image_of(c: Obj) -> eff.Image:
    return eff.read_image(dockerfile_images()[image_name(c["image"])])


# ------------------------------------------------------------------------------------------- the stand-ins


def redis_cluster_with_the_manifests_acl(objects: list[Obj], sources: eff.Sources) -> LocalCluster:
    import redis

    statefulset = find(objects, "StatefulSet", "redis-cluster")
    server = container(statefulset, "redis")
    env = eff.container_env(server, sources, {"status.podIP": "127.0.0.1", "metadata.name": "redis-cluster-0",
                                              "metadata.namespace": "recserve"}, "redis-cluster/redis")  # fmt: skip
    script = "\n".join(server.get("args", []))
    users = [
        re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line.strip()).split()[1:]
        for line in script.splitlines()
        if line.strip().startswith("user ")
    ]
    assert any(u[0] == "recserve" for u in users), f"expected an ACL user recserve in the StatefulSet, found {users}"
    users.sort(key=lambda u: u[0] == "default")  # the default user last: the test connects as it until then
    cluster = start_cluster(masters=3)
    try:
        for node in cluster.nodes:
            client = redis.Redis(port=node.port)
            for user in users:
                client.execute_command("ACL", "SETUSER", *user)
            client.close()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _filters(words: list[str]) -> tuple[list[tuple[bool, str]], list[str]]:
    """aws s3 sync's ``--exclude``/``--include`` filters (in order) and its positional arguments."""
    filters, positional = [], []
    while words:
        word = words.pop(0)
        if word in ("--exclude", "--include"):
            filters.append((word == "--include", words.pop(0)))
        elif not word.startswith("--"):
            positional.append(word)
    return filters, positional


def _mirror(source: str, filters: list[tuple[bool, str]], target: Path, env: dict[str, str], store: dict[str, Path],
            who: str) -> None:  # fmt: skip
    """What ``aws s3 sync`` of ``source`` leaves in ``target``, from the test's object store."""
    prefix = env["ARTIFACT_URI"].rstrip("/") + "/"
    assert source.startswith(prefix), f"{who}: syncs from {source}, outside ARTIFACT_URI {prefix}"
    folder = store.get(source.removeprefix(prefix).rstrip("/") + "/")
    assert folder is not None, f"{who}: nothing is published at {source} (published: {sorted(store)})"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = str(path.relative_to(folder))
        included = True  # aws s3: every file, then each filter in order; the last that matches decides
        for include, pattern in filters:
            if re.fullmatch(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."), relative):
                included = include
        if included:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)


def replay_s3_sync(init: Obj, env: dict[str, str], root: Path, store: dict[str, Path], who: str) -> None:
    """What an aws-cli init container leaves behind, from the test's object store: its ``aws s3 sync`` lines,
    and its rounds of k8s/base/sync/artifact-sync.sh (the sync replayed into STAGING, then the script's own
    ``promote`` run on the pod's folders)."""
    script = re.sub(r"\\\n\s*", " ", "\n".join(init.get("args", [])))  # continued lines joined
    synced = 0
    for line in script.splitlines():
        words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line))
        if "aws s3 sync" in line:
            filters, (source, dest) = _filters(words[words.index("sync") + 1 :])
            _mirror(source, filters, Path(eff.remap_path(dest, root)), env, store, who)
        elif "artifact-sync.sh sync" in line:
            at = words.index("sync")
            source, staging, live = words[at + 1 : at + 4]
            extra = words[at + 4 :]
            assert extra[:1] in ([], ["--"]), f"{who}: one round (no EVERY_S) expected, found {line}"
            filters, _ = _filters(extra[1:])
            _mirror(source, filters, Path(eff.remap_path(staging, root)), env, store, who)
            promote = [words[at - 2], eff.remap_path(words[at - 1], root), "promote"]
            promote += [eff.remap_path(staging, root), eff.remap_path(live, root)]
            done = subprocess.run(promote, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, f"{who}: {shlex.join(promote)} exited {done.returncode}:\n{done.stderr}"
        else:
            continue
        synced += 1
    assert synced, f"{who}: an aws-cli init container without `aws s3 sync`: the test cannot tell what it leaves"


@dataclass
class Pod:
    """One pod of a workload, laid out under ``folder``; ``process`` gives each container's local command."""

    workload: Obj
    objects: list[Obj]
    sources: eff.Sources
    folder: Path
    addresses: dict[str, str]
    store: dict[str, Path]
    fields: dict[str, str]

    def __post_init__(self) -> None:
        self.spec = pod_template(self.workload)["spec"]
        self.who = f"{self.workload['kind']}/{self.workload['metadata']['name']}"
        for init in self.spec.get("initContainers", []):
            assert image_name(init["image"]) == AWS_CLI, f"{self.who}: init container {init['name']} not replayed"
            root, env = self._layout(init)
            replay_s3_sync(init, env, root, self.store, f"{self.who}/{init['name']}")

    def _layout(self, c: Obj) -> tuple[Path, dict[str, str]]:
        root = self.folder / c["name"]
        root.mkdir(parents=True, exist_ok=True)
        if image_name(c["image"]) in dockerfile_images():
            eff.install_image(image_of(c), root)
        (root / "tmp").mkdir(exist_ok=True)
        eff.mount_volumes(self.spec, c, root, self.folder / "volumes", self.sources, self.who)
        env = eff.container_env(c, self.sources, self.fields, f"{self.who}/{c['name']}")
        if self.workload["kind"] == "CronJob" and self._job_spec().get("completionMode") == "Indexed":
            env.setdefault("JOB_COMPLETION_INDEX", self.fields[COMPLETION_INDEX])  # the Job controller sets it
        return root, env

    def _job_spec(self) -> Obj:
        return dict(self.workload["spec"]["jobTemplate"]["spec"])

    def process(self, name: str, ports: dict[str, str] | None = None) -> tuple[list[str], dict[str, str], Path]:
        c = container(self.workload, name)
        root, env = self._layout(c)
        image = image_of(c)
        argv = eff.effective_argv(c, image, env)
        who = f"{self.who}/{name}"
        local_env = eff.local_environment(env, root, self.addresses, who)
        return eff.local_argv(argv, root, self.addresses, ports or {}, who), local_env, root / image.workdir.lstrip("/")


COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def pod_fields(name: str, index: int = 0) -> dict[str, str]:
    return {
        "metadata.name": f"{name}-{index}",
        "metadata.namespace": "recserve",
        "status.podIP": "127.0.0.1",
        COMPLETION_INDEX: str(index),
    }


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def run_job(pod: Pod, name: str, log: Path) -> subprocess.Popen[bytes]:
    argv, env, cwd = pod.process(name)
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def wait_exit_0(process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    try:
        code = process.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"{what}: still running after {JOB_TIMEOUT_S} s\n{tail(log)}") from None
    assert code == 0, f"{what}: exit {code}\n{shlex.join(map(str, process.args))}\n{tail(log)}"  # type: ignore[arg-type]


def http_get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5.0)
    except httpx.TransportError:
        return None


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_first_party_container_is_run_here_or_says_why_not(name: str) -> None:
    found = {key(w, c) for w, c in first_party(overlay(name))}
    assert found <= set(RUN) | set(NOT_RUN), (
        f"new first-party containers, neither run nor excused: {found - set(RUN) - set(NOT_RUN)}"
    )
    assert set(RUN) <= found, f"expected to run {sorted(set(RUN) - found)} in {name}, but the overlay has none"


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_overlays_containers_run_against_the_test_stack(
    name: str, exported: Exported, triton: Any, tmp_path: Path
) -> None:
    """The load Job exits 0 on the small bundle; then the first and the last pre-compute pod exit 0 while the
    orchestrator, started by its image's ENTRYPOINT as the Deployment leaves it, answers its readiness probe and
    ranks a recommendation on Triton. See the module docstring for what stands in for the cluster."""
    require_redis()
    objects = overlay(name)
    sources = eff.Sources(objects, OUT_OF_BAND_SECRETS)
    config = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("recserve-config")
    )
    dataset = config["data"]["RECSERVE_DATASET"]
    # What the export Job publishes (its publish container's sync lines): the bundle folder and the model repository.
    store = {"artifacts/": exported.build_dir / "artifacts" / dataset, "model_repository/gpu-t4/": exported.repo}
    started = time.monotonic()
    phases: dict[str, float] = {}  # seconds from the start, printed for -s: where the time goes

    def mark(phase: str) -> None:
        phases[phase] = round(time.monotonic() - started, 1)

    cluster = redis_cluster_with_the_manifests_acl(objects, sources)
    mark("redis cluster")
    try:
        addresses = {"redis-cluster": cluster.nodes[0].address, "triton-headless": triton.grpc_url}

        def pod(kind: str, workload: str, index: int = 0) -> Pod:
            obj = find(objects, kind, workload)
            folder = tmp_path / f"{workload}-{index}"
            return Pod(obj, objects, sources, folder, addresses, store, pod_fields(workload, index))

        load_log = tmp_path / "load.log"
        wait_exit_0(run_job(pod("Job", "recserve-load"), "load", load_log), load_log, f"{name}: the load Job")
        mark("load")

        # The pre-compute pods and the orchestrator need only what the load wrote: they run side by side.
        cronjob = find(objects, "CronJob", "recserve-precompute")
        completions = int(cronjob["spec"]["jobTemplate"]["spec"]["completions"])
        shards = sorted({0, completions - 1})
        logs = {i: tmp_path / f"precompute-{i}.log" for i in shards}
        running = {i: run_job(pod("CronJob", "recserve-precompute", i), "precompute", logs[i]) for i in shards}
        try:
            deployment = find(objects, "Deployment", "orchestrator")
            port = str(free_port())
            http = next(p for p in container(deployment, "orchestrator")["ports"] if p["name"] == "http")
            argv, env, cwd = pod("Deployment", "orchestrator").process(
                "orchestrator", ports={str(http["containerPort"]): port, "0.0.0.0": "127.0.0.1"}
            )
            assert Path(argv[0]).name == "uvicorn", f"expected the image's ENTRYPOINT (uvicorn), found {argv}"
            serve_orchestrator(name, argv, env, cwd, f"http://127.0.0.1:{port}", deployment, exported, tmp_path)
            mark("orchestrator ready, ranked, stopped")
            for i, process in running.items():
                wait_exit_0(process, logs[i], f"{name}: pre-compute pod {i} of {completions}")
            mark("pre-compute")
        finally:
            for process in running.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
    finally:
        cluster.stop()
    print(f"{name}: {phases}")
    missing_docs = [s for s in sources.used_out_of_band if f"create secret generic {s}" not in deploy_doc()]
    assert not missing_docs, f"{name} needs Secrets docs/DEPLOY.md does not create: {missing_docs}"


def deploy_doc() -> str:
    return re.sub(r"\\\n\s*", "", (REPO / "docs" / "DEPLOY.md").read_text())


def serve_orchestrator(
    name: str, argv: list[str], env: dict[str, str], cwd: Path, url: str, deployment: Obj, exported: Exported,
    tmp_path: Path,
) -> None:  # fmt: skip
    spec = container(deployment, "orchestrator")
    ready_path = spec["readinessProbe"]["httpGet"]["path"]
    log = tmp_path / "orchestrator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            assert process.poll() is None, f"{name}: the orchestrator exited {process.returncode}\n{tail(log)}"
            response = http_get(url + ready_path)
            return response is not None and response.status_code == 200

        try:
            poll(ready, READY_TIMEOUT_S, f"{name}: the orchestrator answering {ready_path} with 200", 0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{shlex.join(argv)}\n{tail(log)}") from None
        users = iter(exported.bundle.user_ids)
        answers: list[dict[str, Any]] = []
        request_ids: list[str] = []

        def ranked() -> bool:
            # A realtime answer shows the whole path worked (Redis reads, FAISS, Triton); under the overlay's
            # 80 ms deadline a busy machine may answer one from the fallback first: ask for another user then.
            response = http_get(f"{url}/v1/recommendations/{next(users)}?n=5")
            assert response is not None and response.status_code == 200, response and response.text
            answers.append(response.json())
            request_ids.append(response.headers.get("x-request-id", ""))
            return answers[-1]["source"] == "realtime"

        try:
            poll(ranked, 30.0, f"{name}: a realtime recommendation", 0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last answers: {answers[-3:]}\n{tail(log)}") from None
        assert len(answers[-1]["items"]) == 5 and answers[-1]["model_version"] == exported.bundle.model_version
        assert request_ids[-1], "every answer carries its X-Request-Id"
        # The service's log lines are JSON objects (RECSERVE_TELEMETRY_LOG_FORMAT's default), uvicorn's own too.
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert any(line["logger"].startswith("uvicorn") for line in lines), tail(log)
        assert all({"ts", "level", "logger", "msg", "request_id"} <= set(line) for line in lines), tail(log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
