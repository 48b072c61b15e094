"""Model versions in one replica (orchestrator/versioning.py): a request serves from the one version it took at
its start, cached lists are per version, and the watcher follows the pointer, building the new version beside
the old one and swapping only once it is built."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.readiness import Readiness
from orchestrator.recommender import RequestContext
from orchestrator.store import keys
from orchestrator.store.backend import Command
from orchestrator.store.versions import VersionInfo
from orchestrator.versioning import ModelVersion, VersionWatcher, version_path
from tests.unit.test_recommender_flow import FakeRanker, GatedRetriever, make
from tests.waiting import until


class Ranker2(FakeRanker):
    model_version = "v-two"


async def test_a_request_finishes_on_the_version_it_started_with_and_the_next_takes_the_new_one() -> None:
    recommender = await make(FakeRanker())
    recommender.settings = recommender.settings.model_copy(
        update={"deadline": recommender.settings.deadline.model_copy(update={"request_ms": 5000})}
    )
    recommender.retriever = gated = GatedRetriever()
    first = asyncio.ensure_future(recommender.recommend("1", 3, RequestContext()))
    await gated.entered.wait()  # the request holds v-test's parts
    old = recommender.swap(replace(recommender.current, version="v-two", ranker=Ranker2(), retriever=GatedRetriever()))
    assert old.version == "v-test"
    gated.gate.set()
    answer = await first
    assert (answer.source, answer.model_version) == ("realtime", "v-test")
    recommender.current.retriever.gate.set()  # type: ignore[attr-defined]
    second = await recommender.recommend("1", 3, RequestContext())
    # v-test's list is cached, but under v-test: the new version computes its own.
    assert (second.source, second.model_version) == ("realtime", "v-two")
    await recommender.drain()
    third = await recommender.recommend("1", 3, RequestContext())
    assert (third.source, third.model_version) == ("cache", "v-two")
    recommender.swap(old)  # back: v-test's list is still cached (not emptied at the switch)
    again = await recommender.recommend("1", 3, RequestContext())
    assert (again.source, again.model_version) == ("cache", "v-test")


def test_a_path_names_the_version_by_its_number() -> None:
    assert version_path(Path("/a/v{version}/index.faiss"), 3) == Path("/a/v3/index.faiss")
    assert version_path(Path("/a/index.faiss"), 3) == Path("/a/index.faiss")
    with pytest.raises(FileNotFoundError, match="names a version number"):
        version_path(Path("/a/v{version}/index.faiss"), None)


class ControlBackend:
    """Control commands on a dict: the pointer, version metadata and the replicas' claims."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.claims: dict[str, float] = {}

    async def control(self, command: Command) -> Any:
        if command.name == "GET":
            return self.values.get(command.key)
        if command.name == "ZADD":
            args = list(command.args)
            for score, member in zip(args[::2], args[1::2], strict=True):
                self.claims[member] = float(score)
            return len(args) // 2
        if command.name == "ZREM":
            for member in command.args:
                self.claims.pop(member, None)
            return 1
        raise AssertionError(f"unexpected {command}")


class Holder:
    def __init__(self, version: ModelVersion) -> None:
        self.current = version
        self.canary: tuple[ModelVersion, int] | None = None

    def swap(self, new: ModelVersion) -> ModelVersion:
        old, self.current = self.current, new
        return old

    def set_canary(self, canary: tuple[ModelVersion, int] | None) -> tuple[ModelVersion, int] | None:
        old, self.canary = self.canary, canary
        return old


class ClosingRanker(FakeRanker):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


def version(name: str, ranker: FakeRanker | None = None) -> ModelVersion:
    return ModelVersion(name, GatedRetriever(), ranker or FakeRanker(), None, None, None, 3)  # type: ignore[arg-type]


async def test_the_watcher_builds_the_new_version_then_swaps_and_closes_the_old_after_draining() -> None:
    backend = ControlBackend()
    old_ranker = ClosingRanker()
    holder = Holder(version("v1", old_ranker))
    built: list[VersionInfo] = []
    fail = True

    async def build(info: VersionInfo) -> ModelVersion:
        built.append(info)
        if fail:
            raise FileNotFoundError("no index for v2 yet")
        return version(info.version)

    clock = [0.0]
    watcher = VersionWatcher(
        backend,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        holder,
        build,
        drain_s=0.01,
        behind_max_s=30,
        replica="r1",
        clock=lambda: clock[0],
    )
    assert not await watcher.check()  # no pointer yet
    backend.values[keys.ACTIVE_POINTER] = b"v1"
    assert not await watcher.check() and not built
    backend.values[keys.ACTIVE_POINTER] = b"v2"
    backend.values[keys.version_meta("v2")] = b'{"version": "v2", "dim": 8, "triton_version": 2}'
    assert not await watcher.check()  # the build fails: still v1, still ready for a while
    assert holder.current.version == "v1" and watcher.readiness() == Readiness(True, "ok (v1; loading v2)")
    assert built == [VersionInfo("v2", 8, "fp32", 2)]
    clock[0] = 31.0
    assert not watcher.readiness().ok and "no index for v2 yet" in watcher.readiness().state
    fail = False
    assert await watcher.check()
    assert holder.current.version == "v2" and watcher.readiness() == Readiness(True, "ok (v2)")
    assert sorted(backend.claims) == ["r1 v1", "r1 v2"]  # the new one claimed before it loaded
    assert watcher.held() == ["v1", "v2"]  # v1 drains
    await until(lambda: old_ranker.closed and sorted(backend.claims) == ["r1 v2"], 5, "v1 closed and unclaimed")
    assert watcher.held() == ["v2"]
    await watcher.aclose()
    assert backend.claims == {}


async def test_a_canary_serves_its_share_of_users_by_a_stable_hash_and_is_promoted_without_a_rebuild() -> None:
    from orchestrator.recommender import user_bucket

    recommender = await make(FakeRanker())
    backend = ControlBackend()
    builds: list[str] = []

    async def build(info: VersionInfo) -> ModelVersion:
        builds.append(info.version)
        return replace(recommender.current, version=info.version, ranker=Ranker2())

    watcher = VersionWatcher(backend, None, recommender, build, drain_s=0.01, replica="r1")  # type: ignore[arg-type]
    backend.values[keys.ACTIVE_POINTER] = b"v-test"
    backend.values[keys.version_meta("v-two")] = b'{"version": "v-two", "dim": 8}'
    backend.values[keys.CANARY_POINTER] = b"v-two 30"
    assert not await watcher.check()
    assert builds == ["v-two"] and watcher.held() == ["v-test", "v-two"]
    assert watcher.readiness() == Readiness(True, "ok (v-test; canary v-two 30%)")
    users = [str(u) for u in range(400)]
    arms = {u: recommender.pick(u)[1] for u in users}
    assert arms == {u: "canary" if user_bucket(u) < 30 else "active" for u in users}
    assert 0.2 < sum(arm == "canary" for arm in arms.values()) / len(users) < 0.4
    canary_user = next(u for u in users if arms[u] == "canary")
    answer = await recommender.recommend(canary_user, 3, RequestContext())
    assert (answer.arm, answer.model_version) == ("canary", "v-two")
    # Promotion: the pointer moves to the canary and the canary ends; nothing is built again.
    backend.values[keys.ACTIVE_POINTER] = b"v-two"
    del backend.values[keys.CANARY_POINTER]
    assert await watcher.check()
    assert builds == ["v-two"] and recommender.current.version == "v-two" and recommender.canary is None
    assert all(recommender.pick(u) == (recommender.current, "active") for u in users)


async def test_each_version_counts_the_top_score_of_its_ranked_answers_only() -> None:
    from prometheus_client import REGISTRY

    def observed(version: str) -> tuple[float, float]:
        labels = {"version": version}
        count = REGISTRY.get_sample_value("recserve_version_top_score_count", labels) or 0.0
        return count, REGISTRY.get_sample_value("recserve_version_top_score_sum", labels) or 0.0

    recommender = await make(FakeRanker())
    before = observed("v-test")
    answer = await recommender.recommend("1", 3, RequestContext())
    assert answer.source == "realtime"
    count, total = observed("v-test")
    assert count == before[0] + 1 and total - before[1] == pytest.approx(answer.items[0][1])
    # A user the model does not know gets a popular list: its scores are counts, not the ranker's.
    unknown = await recommender.recommend("no-such-user", 3, RequestContext())
    assert unknown.source not in {"realtime", "cache", "precomputed"}
    assert observed("v-test")[0] == count
