"""Model releases: publish a version beside the active one, switch to it, roll back, retire the old one.

``publish``: the version's embeddings and features load into Redis beside the active version's (versioned
keys), its Triton version folder goes into the served repository (every version there is served:
``version_policy all``; the local stack's Triton polls its repository), its lists are pre-computed under
its own keys, and only then does the pointer switch (one GETSET) and the notice go out on the version
channel; replicas follow within seconds (orchestrator/versioning.py). ``rollback`` switches back to the
version the last switch replaced. ``retire`` deletes a version's keys and Triton folders, refused while it
is active or while a replica still holds it (replicas register what they hold, with a TTL).

Against the local stack these find Redis and Triton through ``build/stack.env`` (``make up`` writes it);
this module reads that file itself, since the offline pipeline does not import the stack package.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from export.artifacts import BUILD_DIR, MODEL_REPOSITORY, Bundle
from export.dataplane import Backend, faiss_retriever, onnx_ranker
from export.errors import ExportError
from export.load import LoadConfig, load
from export.precompute import PrecomputeConfig, precompute
from export.triton_config import ranker_models
from orchestrator.store import versions

log = logging.getLogger(__name__)

STACK_ENV = BUILD_DIR / "stack.env"
# The names of build/stack.env this module reads (stack/up.py writes them).
REDIS_URLS, REDIS_MODE = "RECSERVE_REDIS_URLS", "RECSERVE_REDIS_MODE"
TRITON_HTTP_URL, TRITON_REPOSITORY = "STACK_TRITON_HTTP_URL", "STACK_TRITON_REPOSITORY"


class ReleaseError(ExportError):
    """A release step that cannot go on (the version is not built, Triton does not serve it, ...)."""


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines with shell-quoted values (build/stack.env), as a shell would read them."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or "=" not in line:
            continue
        key, _, rest = line.partition("=")
        words = shlex.split(rest)
        values[key.strip()] = words[0] if words else ""
    return values


@dataclass
class Target:
    """Where a release goes: the Redis of the replicas, and the Triton that serves them (if any)."""

    redis_urls: list[str]
    cluster: bool = False
    timeout_ms: float = 5000.0
    triton_http_url: str | None = None  # http://host:port, to wait for a new version to be served
    served_repositories: list[Path] = field(default_factory=list)  # rendered repositories Triton serves

    @classmethod
    def from_stack_env(cls, values: Mapping[str, str]) -> Target:
        urls = [u.strip() for u in values.get(REDIS_URLS, "").split(",") if u.strip()]
        if not urls:
            raise ReleaseError(f"build/stack.env names no Redis ({REDIS_URLS} is empty)")
        repo = values.get(TRITON_REPOSITORY, "")
        return cls(
            urls,
            cluster=values.get(REDIS_MODE) == "cluster",
            triton_http_url=values.get(TRITON_HTTP_URL) or None,
            served_repositories=[Path(repo)] if repo else [],
        )


def triton_version(bundle: Bundle) -> int:
    return int(bundle.manifest.get("triton_version", 1))


def add_served_version(served: Path, source: Path, version: int) -> list[Path]:
    """Put ``version``'s folder into a rendered (cpu profile) repository that Triton serves, beside the
    versions there: built under a temporary name and renamed, so a polling Triton never sees half of it."""
    added = []
    for model in ranker_models():
        folder = served / model.name
        target = folder / str(version)
        model_file = source / model.name / str(version) / model.filename
        if not folder.is_dir() or target.exists():
            continue
        if not model_file.is_file():
            raise ReleaseError(f"{model_file} is missing: run `python -m export all --version {version}` first")
        staging = folder / f".staging-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        from export.model_repository import fill_version_folder  # imports torch: only where a model is staged

        fill_version_folder(staging, model, model_file)
        staging.rename(target)
        added.append(target)
    return added


def remove_version_folders(repositories: list[Path], version: int) -> list[Path]:
    removed = []
    for repo in repositories:
        for model in ranker_models():
            target = repo / model.name / str(version)
            if target.is_dir():
                shutil.rmtree(target)
                removed.append(target)
    return removed


def replica_urls(http_url: str) -> list[str]:
    """One base URL per address the host of ``http_url`` resolves to. Behind a headless Service (Kubernetes'
    ``triton-headless``) that is one per ready Triton pod, where a plain request would reach whichever pod
    the client picked. IPv4 addresses when the name has any: a dual-stack name lists each pod once per family,
    and Triton listens on IPv4. Empty when the name resolves to nothing (a headless Service without a ready pod
    has no address), which a wait treats as "not yet"."""
    parts = urllib.parse.urlsplit(http_url)
    if parts.hostname is None:
        raise ReleaseError(f"expected Triton's HTTP address as http://host:port, but found {http_url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    ipv4 = sorted({str(info[4][0]) for info in found if info[0] == socket.AF_INET})
    ipv6 = sorted({str(info[4][0]) for info in found if info[0] == socket.AF_INET6})
    hosts = ipv4 or [f"[{address}]" for address in ipv6]
    return [f"{parts.scheme}://{host}:{port}" for host in hosts]


def version_ready(base_url: str, model: str, version: int) -> bool:
    """Triton's HTTP readiness of one model version (``/v2/models/<m>/versions/<n>/ready`` answers 200)."""
    try:
        with urllib.request.urlopen(f"{base_url}/v2/models/{model}/versions/{version}/ready", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_until_every_replica_serves(
    replicas: Callable[[], list[str]],
    model: str,
    version: int,
    timeout_s: float,
    every_s: float = 0.5,
    where: str = "Triton",
) -> None:
    """Until every replica ``replicas()`` names (asked again each round: replicas come and go) reports the
    version ready. Raises ReleaseError naming those that do not after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        urls = replicas()
        waiting = [url for url in urls if not version_ready(url, model, version)]
        if urls and not waiting:
            return
        if time.monotonic() > deadline:
            found = (
                f"{len(waiting)} of {len(urls)} replicas did not: {', '.join(waiting)}"
                if urls
                else "its host resolved to no address"
            )
            raise ReleaseError(
                f"expected every replica of {where} to serve {model} version {version} within {timeout_s:.0f} s, "
                f"but {found} (is the repository polled, --model-control-mode=poll, and has the version folder "
                "reached it?)"
            )
        time.sleep(every_s)


def wait_until_served(http_url: str, model: str, version: int, timeout_s: float) -> None:
    """Until every Triton replica behind ``http_url`` (every address of its host) serves the version: the
    switch that follows must not send a replica's requests to a version it has not loaded."""
    wait_until_every_replica_serves(
        lambda: replica_urls(http_url), model, version, timeout_s, where=f"Triton at {http_url}"
    )


@dataclass
class PublishReport:
    version: str
    previous: str | None
    loaded_s: float
    precomputed_s: float
    served: list[Path]
    canary_percent: int | None = None


async def publish(
    backend: Backend,
    bundle: Bundle,
    target: Target,
    repo: Path = MODEL_REPOSITORY,
    dtype: str = "fp32",
    threads: int = 0,
    progress: bool = True,
    served_timeout_s: float = 120.0,
    canary_percent: int | None = None,
) -> PublishReport:
    """Load beside the active version, have Triton serve it, pre-compute its lists, then switch (or, with
    ``canary_percent``, send that share of users to it; publishing it again without one promotes it)."""
    number = triton_version(bundle)
    onnx_path = repo / "ranker_onnx" / str(number) / "model.onnx"
    if not onnx_path.is_file():
        raise ReleaseError(f"{onnx_path} is missing: run `python -m export all --version {number}` first")
    started = time.perf_counter()
    await load(backend, bundle, LoadConfig(dtype=dtype, activate=False, progress=progress))
    loaded_s = time.perf_counter() - started
    served: list[Path] = []
    for served_repo in target.served_repositories:
        served += add_served_version(served_repo, repo, number)
    if target.triton_http_url:
        for model in ranker_models():
            await asyncio.to_thread(wait_until_served, target.triton_http_url, model.name, number, served_timeout_s)
    started = time.perf_counter()
    retriever = faiss_retriever(bundle.path / "item_index.faiss")
    ranker = onnx_ranker(onnx_path, bundle.model_version, threads or (os.cpu_count() or 1))
    await precompute(backend, bundle, retriever, ranker, PrecomputeConfig(), progress=progress)
    precomputed_s = time.perf_counter() - started
    if canary_percent is not None:
        await versions.set_canary(backend, bundle.model_version, canary_percent)
        return PublishReport(
            bundle.model_version, await versions.active_name(backend), loaded_s, precomputed_s, served, canary_percent
        )
    previous = await versions.switch(backend, bundle.model_version)
    return PublishReport(bundle.model_version, previous, loaded_s, precomputed_s, served)


async def rollback(backend: Backend) -> tuple[str, str]:
    return await versions.rollback(backend)


async def retire(
    backend: Backend, name: str, target: Target, repo: Path = MODEL_REPOSITORY, drop_rollback_target: bool = False
) -> tuple[int, list[Path]]:
    """Drop ``name``'s keys (refused while active, while the rollback target unless ``drop_rollback_target``,
    or while a replica holds it), then its Triton version folders. The bundle folder stays."""
    info = await versions.read_meta(backend, name)
    dropped = await versions.retire(backend, name, drop_rollback_target=drop_rollback_target)
    removed: list[Path] = []
    if info.triton_version is not None:
        removed = remove_version_folders([*target.served_repositories, repo], info.triton_version)
    return dropped, removed


def bundle_manifest(path: Path) -> dict[str, object]:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise ReleaseError(f"no bundle at {path} (missing manifest.json): run `python -m export all --version N`")
    value: dict[str, object] = json.loads(manifest.read_text())
    return value
