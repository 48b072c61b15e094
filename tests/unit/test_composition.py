"""The composition root chooses from its tables: every entry builds its type, a kind no table holds stops
the start naming the known ones, and closing and readiness ask every part the same two questions."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import onnx
import pytest
from onnx import TensorProto, helper
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException

from orchestrator.app import create_app
from orchestrator.composition import (
    RANKERS,
    STORE_READS,
    STORE_TOPOLOGIES,
    Services,
    check,
    choose,
    close_services,
    ranker_kind,
)
from orchestrator.config import Ablations, OnnxSettings, RedisSettings, Settings, TritonSettings
from orchestrator.errors import MissingSetting, UnknownKind
from orchestrator.events import EventRecorder
from orchestrator.naive import OneByOneBackend
from orchestrator.popular import PopularLists
from orchestrator.ranking.onnx_ranker import OnnxRanker
from orchestrator.ranking.triton_ranker import TritonRanker
from orchestrator.ratelimit import Limiters
from orchestrator.readiness import Readiness
from orchestrator.recommender import Recommender
from orchestrator.store import Recommendations
from orchestrator.store.sharded import ShardedBackend
from orchestrator.store.versions import VersionInfo

# Nothing listens on port 1: a client that tries to connect is refused at once.
NOWHERE = "redis://127.0.0.1:1/0"
READY = Readiness(True, "ok")


def test_the_tables_hold_the_kinds_the_settings_document() -> None:
    assert set(STORE_TOPOLOGIES) == {"sharded", "cluster"}
    assert set(STORE_READS) == {"pipelined", "one_by_one"}
    assert set(RANKERS) == {"triton", "onnx"}


def test_an_unknown_topology_stops_the_start_naming_the_known_ones() -> None:
    settings = Settings(redis=RedisSettings(mode="ring"))
    message = r"RECSERVE_REDIS_MODE must be one of \['cluster', 'sharded'\], but found 'ring'"
    with pytest.raises(UnknownKind, match=message):
        check(settings, Ablations())
    with pytest.raises(UnknownKind, match=message):
        create_app(settings, Ablations())  # at start, before the lifespan connects to anything


def test_an_unknown_kind_of_reads_or_ranker_is_refused_the_same_way() -> None:
    with pytest.raises(UnknownKind, match=r"STORE_READS must be one of \['one_by_one', 'pipelined'\], but found 'x'"):
        check(Settings(), Ablations(store_reads="x"))
    with pytest.raises(UnknownKind, match=r"ranker kind must be one of \['onnx', 'triton'\], but found 'tensorrt'"):
        choose(RANKERS, "tensorrt", "the ranker kind")


async def test_the_sharded_entry_builds_a_ring_over_every_url() -> None:
    settings = Settings(redis=RedisSettings(urls=f"{NOWHERE}, redis://127.0.0.1:2/0", timeout_ms=10))
    backend = await STORE_TOPOLOGIES["sharded"](settings)
    assert isinstance(backend, ShardedBackend)
    assert backend.shards == ("127.0.0.1:1", "127.0.0.1:2")
    assert await backend.ready() == Readiness(False, "unreachable")
    await backend.aclose()


async def test_the_cluster_entry_discovers_the_cluster_from_the_first_url() -> None:
    settings = Settings(redis=RedisSettings(mode="cluster", urls=f"{NOWHERE},redis://127.0.0.1:2/0"))
    with pytest.raises(RedisClusterException, match=r"Redis Cluster cannot be connected.*127\.0\.0\.1:1"):
        await STORE_TOPOLOGIES["cluster"](settings)


async def test_the_read_entries_wrap_the_topology_or_leave_it() -> None:
    backend = await STORE_TOPOLOGIES["sharded"](Settings(redis=RedisSettings(urls=NOWHERE)))
    assert STORE_READS["pipelined"](backend) is backend
    one_by_one = STORE_READS["one_by_one"](backend)
    assert isinstance(one_by_one, OneByOneBackend) and one_by_one.inner is backend
    await one_by_one.aclose()


async def test_the_triton_entry_builds_a_triton_ranker_behind_the_configured_breaker() -> None:
    settings = Settings(triton=TritonSettings(url="127.0.0.1:1", model="m", breaker_failures=3, breaker_reset_s=7))
    assert ranker_kind(settings) == "triton"
    ranker = await RANKERS["triton"](settings, VersionInfo("v1", 8))
    assert isinstance(ranker, TritonRanker)
    assert (ranker.url, ranker.model, ranker.model_version) == ("127.0.0.1:1", "m", "v1")
    assert (ranker.breaker.failures, ranker.breaker.reset_s) == (3, 7.0)
    assert await ranker.ready() == Readiness(False, "unreachable (triton, circuit closed)")
    await ranker.aclose()
    with pytest.raises(MissingSetting, match="RECSERVE_TRITON_URL must be set for the triton ranker"):
        await RANKERS["triton"](Settings(), VersionInfo("v1", 8))


async def test_the_onnx_entry_loads_the_model_in_process(tmp_path: Path) -> None:
    # Any model loads: the table is what is under test, not the ranker.
    x, score = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [None]) for name in ("x", "score"))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["score"])], "identity", [x], [score])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    settings = Settings(onnx=OnnxSettings(model_path=tmp_path / "model.onnx"))
    assert ranker_kind(settings) == "onnx"
    ranker = await RANKERS["onnx"](settings, VersionInfo("v1", 8))
    assert isinstance(ranker, OnnxRanker) and ranker.model_version == "v1"
    assert await ranker.ready() == Readiness(True, "ok (in-process onnxruntime)")
    await ranker.aclose()


class Part:
    """Any seam: says what it was told to, and notes when it is closed."""

    def __init__(self, name: str, readiness: Readiness, closed: list[str]) -> None:
        self.name = name
        self.readiness = readiness
        self.closed = closed
        self.model_version = "v1"

    async def ready(self) -> Readiness:
        return self.readiness

    async def aclose(self) -> None:
        self.closed.append(self.name)


class NoPopularLists:
    async def get_popular(self, segment: str) -> Recommendations | None:
        return None

    async def get_recs(self, user_ids: Sequence[str]) -> list[Recommendations | None]:
        return [None for _ in user_ids]

    async def set_recs(self, recs: Mapping[str, Recommendations], ttl_s: int) -> None: ...

    async def set_popular(self, segment: str, recs: Recommendations) -> None: ...


class Drained:
    def __init__(self) -> None:
        self.drained = False

    async def drain(self) -> None:
        self.drained = True


def services(closed: list[str], **parts: Any) -> Services:
    def part(name: str, readiness: Readiness = READY) -> Any:
        return parts.get(name) or Part(name, readiness, closed)

    return Services(
        settings=Settings(),
        backend=part("backend"),
        pubsub=cast(Redis, part("pubsub")),
        retriever=part("retriever", Readiness(True, "ok (3 items)")),
        ranker=part("ranker"),
        popular=PopularLists(NoPopularLists()),
        recommender=cast(Recommender, Drained()),
        events=cast(EventRecorder, None),
        limiters=cast(Limiters, None),
        catalogue=frozenset(),
        tasks=[],
    )


async def test_readiness_asks_every_part_the_same_question() -> None:
    down = Part("ranker", Readiness(False, "unreachable (some ranker)"), [])
    readiness = await services([], ranker=down).readiness()
    assert {name: part.state for name, part in readiness.items()} == {
        "redis": "ok",
        "index": "ok (3 items)",
        "ranker": "unreachable (some ranker)",
        "popular": "not loaded",
    }
    assert [name for name, part in readiness.items() if not part.ok] == ["ranker", "popular"]


async def test_closing_drains_then_closes_every_part_whatever_its_kind() -> None:
    closed: list[str] = []
    built = services(closed)
    await close_services(built)
    assert cast(Drained, built.recommender).drained
    assert closed == ["ranker", "retriever", "pubsub", "backend"]
