"""What a rendered container would run: its effective command and environment, by Kubernetes' rules, and the
pod's filesystem laid out under a local folder, so that tests/k8s/test_run_manifests.py can run it as a local
process. Helpers only: no tests here (their rules are pinned in tests/k8s/test_effective.py).

Kubernetes' rules, as the API reference states them:
- ``command`` replaces the image's ENTRYPOINT (and drops its CMD); ``args`` replace CMD; neither: ENTRYPOINT + CMD.
- ``$(VAR)`` in ``command``, ``args`` and ``env[].value`` expands to a variable defined before it (``envFrom``,
  then the ``env`` entries above); an undefined one stays as written; ``$$`` is a literal ``$``.
- ``envFrom`` first, in order (later sources win), then ``env`` (wins over ``envFrom``).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tests.k8s.render import REPO, Obj, find

VENV_BIN = REPO / ".venv" / "bin"
# The image's executables, as the venv has them (the images install the package into /opt/venv).
EXECUTABLES = {"python": VENV_BIN / "python", "python3": VENV_BIN / "python", "uvicorn": VENV_BIN / "uvicorn"}
CLUSTER_ADDRESS = re.compile(r"\b([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local(?::(\d+))?")
LISTEN_OPTIONS = ("--host", "--port", "--bind")
_EXPANSION = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ----------------------------------------------------------------------------------------------- images


@dataclass
class Image:
    """The final stage of a Dockerfile: what a container of it starts with."""

    dockerfile: Path
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = "/"
    copies: list[tuple[list[str], str]] = field(default_factory=list)  # (sources in the context, destination)


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _exec_form(rest: str) -> list[str]:
    # Exec form (JSON array) as written; shell form runs under /bin/sh -c, as Docker does.
    return list(json.loads(rest)) if rest.startswith("[") else ["/bin/sh", "-c", rest]


def read_image(dockerfile: Path) -> Image:
    image = Image(dockerfile)
    for keyword, rest in _instructions(dockerfile.read_text()):
        if keyword == "FROM":
            # A new stage: nothing of the previous one reaches the final image except by COPY --from.
            # CMD and ENTRYPOINT of the base image (python's CMD is python3) are reset by our ENTRYPOINT.
            image = Image(dockerfile)
        elif keyword == "ENTRYPOINT":
            image.entrypoint, image.cmd = _exec_form(rest), []
        elif keyword == "CMD":
            image.cmd = _exec_form(rest)
        elif keyword == "WORKDIR":
            image.workdir = str(PurePosixPath(image.workdir) / rest)
        elif keyword == "COPY" and "--from=" not in rest:
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            image.copies.append((words[:-1], str(PurePosixPath(image.workdir) / words[-1])))
    assert image.entrypoint or image.cmd, f"{dockerfile}: expected an ENTRYPOINT or CMD in the final stage"
    return image


def dockerignore(dockerfile: Path) -> list[str]:
    path = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not path.is_file():
        return []
    return [line.strip().rstrip("/") for line in path.read_text().splitlines() if line.strip() and line[0] != "#"]


def _ignored(relative: str, patterns: list[str]) -> bool:
    return any(
        fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(relative, pattern.removeprefix("**/"))
        or fnmatch.fnmatch(relative.rsplit("/", 1)[-1], pattern.removeprefix("**/"))
        for pattern in patterns
    )  # fmt: skip


def install_image(image: Image, root: Path) -> None:
    """The image's own files (its COPY instructions from the repository, minus its .dockerignore) under ``root``."""
    patterns = dockerignore(image.dockerfile)

    def ignore(folder: str, names: list[str]) -> list[str]:
        base = Path(folder).relative_to(REPO)
        return [n for n in names if _ignored(str(base / n), patterns)]

    for sources, dest in image.copies:
        target = root / dest.lstrip("/")
        for source in sources:
            path = REPO / source
            if path.is_dir():
                where = target if len(sources) == 1 and not dest.endswith("/") else target / source
                shutil.copytree(path, where, ignore=ignore, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)


# ------------------------------------------------------------------------------------------- the API rules


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables only, ``$$`` for a literal ``$``."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _EXPANSION.sub(one, value)


def effective_argv(container: Obj, image: Image, env: Mapping[str, str]) -> list[str]:
    """The container's command line: ``command``/``args`` over the image's ENTRYPOINT/CMD, expanded."""
    command, args = container.get("command"), container.get("args")
    ours = [expand(a, env) for a in args or []]
    if command is not None:
        return [expand(c, env) for c in command] + ours
    if args is not None:
        return list(image.entrypoint) + ours
    return list(image.entrypoint) + list(image.cmd)


def secret_data(obj: Obj) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return data | dict(obj.get("stringData") or {})


class Sources:
    """ConfigMaps and Secrets by name: the rendered ones, then those created out of band (a name -> data table)."""

    def __init__(self, objects: list[Obj], out_of_band: Mapping[str, Mapping[str, str]]) -> None:
        self.objects = objects
        self.out_of_band = out_of_band
        self.used_out_of_band: set[str] = set()

    def get(self, kind: str, name: str, optional: bool, who: str) -> dict[str, str] | None:
        if any(o["kind"] == kind and o["metadata"]["name"] == name for o in self.objects):
            obj = find(self.objects, kind, name)
            return secret_data(obj) if kind == "Secret" else dict(obj.get("data") or {})
        if kind == "Secret" and name in self.out_of_band:
            self.used_out_of_band.add(name)
            return dict(self.out_of_band[name])
        assert optional, f"{who} needs {kind} {name!r}, but the overlay renders none and none is created out of band"
        return None


def container_env(container: Obj, sources: Sources, pod_fields: Mapping[str, str], who: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                ref = source[key]
                data = sources.get(kind, ref["name"], ref.get("optional", False), who)
                env |= {prefix + k: v for k, v in (data or {}).items()}
    for item in container.get("env", []):
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(item.get("value", ""), env)
            continue
        value_from = item["valueFrom"]
        if "fieldRef" in value_from:
            path = value_from["fieldRef"]["fieldPath"]
            assert path in pod_fields, f"{who}: env {name} reads {path}, which the test's pod does not give"
            env[name] = pod_fields[path]
            continue
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if key in value_from:
                ref = value_from[key]
                data = sources.get(kind, ref["name"], ref.get("optional", False), who)
                if data is not None:
                    assert ref["key"] in data or ref.get("optional"), f"{who}: {kind} {ref['name']} has no {ref['key']}"
                    if ref["key"] in data:
                        env[name] = data[ref["key"]]
                break
        else:
            raise AssertionError(f"{who}: env {name} uses a valueFrom the test does not resolve: {value_from}")
    return env


# ------------------------------------------------------------------------------------- the pod, locally


def replace_cluster_addresses(value: str, addresses: Mapping[str, str], who: str) -> str:
    """``<service>.<namespace>.svc.cluster.local[:port]`` -> the local address that stands for the service."""

    def one(match: re.Match[str]) -> str:
        service = match.group(1)
        assert service in addresses, f"{who}: {match.group(0)} has no local stand-in (know {sorted(addresses)})"
        return addresses[service]

    return CLUSTER_ADDRESS.sub(one, value)


def remap_path(value: str, root: Path) -> str:
    """An absolute path inside the container (its first folder present under ``root``) -> the same under root."""
    head, sep, tail = value.partition("=")
    if sep and tail.startswith("/") and not head.startswith("/"):
        return f"{head}={remap_path(tail, root)}"
    if value.startswith("/") and " " not in value:
        first = PurePosixPath(value).parts[1] if len(PurePosixPath(value).parts) > 1 else ""
        if first and (root / first).exists():
            return str(root) + value
    return value


def mount_volumes(pod_spec: Obj, container: Obj, root: Path, volumes_dir: Path, sources: Sources, who: str) -> None:
    """The container's volumeMounts under ``root``: one folder per pod volume (shared by the pod's containers,
    as the kubelet shares it; a ``subPath`` mounts a folder of it), Secret and ConfigMap volumes written out as
    the kubelet writes them."""
    by_name = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = by_name[mount["name"]]
        folder = volumes_dir / mount["name"]
        if not folder.exists():
            folder.mkdir(parents=True)
            for kind, key, name_key in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
                if key in volume:
                    spec = volume[key]
                    data = sources.get(kind, spec[name_key], spec.get("optional", False), who) or {}
                    mode = spec.get("defaultMode", 0o644)
                    items = spec.get("items") or [{"key": k, "path": k} for k in data]
                    for item in items:
                        (folder / item["path"]).write_text(data[item["key"]])
                        (folder / item["path"]).chmod(mode)
            unknown = set(volume) - {"name", "emptyDir", "secret", "configMap"}
            assert not unknown, f"{who}: volume {mount['name']} is of a kind the test does not lay out: {unknown}"
        target = root / mount["mountPath"].lstrip("/")
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)  # a volume hides what the image has at its mount path
        target.parent.mkdir(parents=True, exist_ok=True)
        source = folder / mount["subPath"] if mount.get("subPath") else folder
        source.mkdir(parents=True, exist_ok=True)  # the kubelet creates a missing subPath
        target.symlink_to(source, target_is_directory=True)


def local_environment(env: Mapping[str, str], root: Path, addresses: Mapping[str, str], who: str) -> dict[str, str]:
    """The process environment: the container's variables (addresses and paths made local) over what the image's
    ENV gives every container (PATH with the venv first, as /opt/venv/bin is in the images)."""
    import os

    base = {
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(root / "tmp"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    local = {k: remap_path(replace_cluster_addresses(v, addresses, who), root) for k, v in env.items()}
    return base | local


def local_argv(
    argv: list[str], root: Path, addresses: Mapping[str, str], ports: Mapping[str, str], who: str
) -> list[str]:
    """The command line with the image's executables taken from the venv, cluster addresses and in-container
    paths made local, and the listening address and ports replaced (``ports``: in-container -> local)."""
    assert argv, f"{who}: empty command"
    executable = EXECUTABLES.get(argv[0], Path(argv[0]))
    assert executable.exists(), f"{who}: {argv[0]} is neither an image executable the venv has nor on this machine"
    out = [str(executable)]
    for arg in argv[1:]:
        arg = remap_path(replace_cluster_addresses(arg, addresses, who), root)
        option, sep, value = arg.partition("=")
        if out[-1] in LISTEN_OPTIONS:
            arg = ports.get(arg, arg)
        elif sep and option in LISTEN_OPTIONS:
            arg = f"{option}={ports.get(value, value)}"
        out.append(arg)
    return out
