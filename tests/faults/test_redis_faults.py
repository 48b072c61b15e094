"""Redis faults under load: a shard of the hash ring killed, a Redis Cluster master killed (its replica
takes over), and the only Redis killed and restarted from its append-only file (no accepted event lost;
an event that could not be stored is refused, never acknowledged)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.store import keys
from orchestrator.store.cluster import ClusterBackend
from orchestrator.store.sharded import ShardedBackend, shard_name
from stack.redis_local import RedisServer, start_cluster, start_server
from tests.conftest import API_HEADERS, Stack, running_orchestrator
from tests.faults.conftest import load_stack, users
from tests.faults.harness import CONTEXTS, Figures, Load, metric, stream_ids
from tests.redis_harness import require_redis, start_servers
from tests.waiting import poll

pytestmark = [pytest.mark.faults, pytest.mark.integration]
DEADLINE_MS, RESERVE_MS, MARGIN_MS = 300, 100, 150
RATE, WORKERS = 40.0, 4
STORE_DOWN = 'reason="store_unavailable"'
LOAD = f"{RATE:g} req/s, {WORKERS} clients, random users and contexts"


def fault_env(stack: Stack, triton: Any, **overrides: str) -> dict[str, str]:
    return stack.env(
        triton.grpc_url,
        RECSERVE_DEADLINE_REQUEST_MS=str(DEADLINE_MS),
        RECSERVE_DEADLINE_FALLBACK_RESERVE_MS=str(RESERVE_MS),
        RECSERVE_EVENTS_RATE_PER_S="1000",
        **overrides,
    )


def test_a_killed_shard_degrades_answers_but_they_come(stack: Stack, triton: Any, tmp_path: Path) -> None:
    require_redis()
    figures = Figures(
        "redis_shard_killed",
        "1 of 3 Redis shards (hash ring) SIGKILLed",
        LOAD,
        ".venv/bin/pytest -m faults -s tests/faults/test_redis_faults.py -k shard",
    )
    servers = start_servers(3)
    try:
        urls = [s.url for s in servers]
        load_stack(urls, stack)
        victim = servers[2]  # not the first: that one holds the control keys and the pub/sub channel
        ring = ShardedBackend.from_urls(urls).ring
        on_victim = [u for u in users(stack) if ring.shard_for(keys.seen(u)) == shard_name(victim.url)]
        # No item rows kept in process: every candidate's rows are read from the shards, so those on the dead one
        # go missing, the path under test. Kept rows would still be served (tests/integration/test_store_item_rows.py).
        env = fault_env(stack, triton, RECSERVE_REDIS_URLS=",".join(urls), RECSERVE_CACHE_ITEM_ROWS="0")
        with running_orchestrator(env, tmp_path / "app.log") as app, Load(app.url, users(stack), RATE, WORKERS) as load:
            t0 = time.monotonic()
            load.wait_for(40, t0)
            before = figures.window("before", load.since(t0))
            assert before.errors == 0, before.summary()
            missing_before = metric(app.url, "recserve_missing_features_total", 'kind="item_embedding"')
            victim.kill()
            killed = time.monotonic()
            load.wait_for(int(3 * RATE), killed)
            dead = figures.window("shard dead", load.since(killed))
            assert dead.errors == 0, dead.summary()
            assert dead.p99_ms < DEADLINE_MS + MARGIN_MS, dead.summary()
            # Users whose data lived on the dead shard fall back (their pre-computed list was there too:
            # popular); the others are still ranked in real time, on the candidates the live shards hold.
            assert dead.sources["realtime"] > 0 and dead.sources["popular"] > 0, dead.summary()
            on_victim_answer = httpx.get(f"{app.url}/v1/recommendations/{on_victim[0]}", timeout=5).json()
            assert on_victim_answer["source"] == "popular", on_victim_answer
            assert on_victim_answer["fallback_reason"] == "store_unavailable", on_victim_answer
            missing = metric(app.url, "recserve_missing_features_total", 'kind="item_embedding"') - missing_before
            assert missing > 0
            figures.facts.update(
                {
                    "users on the dead shard": f"{len(on_victim)} of {len(users(stack))}",
                    "candidate embeddings missing (defaulted: dropped, counted)": f"{missing:g}",
                    "store_unavailable fallbacks": metric(app.url, "recserve_fallbacks_total", STORE_DOWN),
                }
            )
    finally:
        for server in servers:
            server.stop()
    figures.write()


async def _load_cluster_and_find_victims(url: str, stack: Stack, victim: str) -> list[str]:
    backend = await ClusterBackend.connect(url, timeout_ms=5000)
    try:
        from export.dataplane import load_and_precompute

        await load_and_precompute(backend, stack.exported.bundle, stack.onnx_path, progress=False)
        return [u for u in users(stack) if backend.node_name(keys.seen(u)) == victim]
    finally:
        await backend.aclose()


def test_a_killed_cluster_master_is_replaced_by_its_replica_and_reads_resume(
    stack: Stack, triton: Any, tmp_path: Path
) -> None:
    require_redis()
    figures = Figures(
        "redis_cluster_failover",
        "Redis Cluster master SIGKILLed (3 masters + 3 replicas, cluster-node-timeout 2000 ms)",
        LOAD,
        ".venv/bin/pytest -m faults -s tests/faults/test_redis_faults.py -k cluster",
    )
    cluster = start_cluster(3, replicas=1, node_timeout_ms=2000)
    try:
        masters = cluster.masters()
        victim = next(m for m in masters if m.port != cluster.nodes[0].port)  # nodes[0] is the seed URL
        on_victim = asyncio.run(_load_cluster_and_find_victims(cluster.url, stack, victim.address))
        assert on_victim
        env = fault_env(stack, triton, RECSERVE_REDIS_URLS=cluster.url, RECSERVE_REDIS_MODE="cluster")
        with running_orchestrator(env, tmp_path / "app.log") as app, Load(app.url, users(stack), RATE, WORKERS) as load:
            t0 = time.monotonic()
            load.wait_for(40, t0)
            before = figures.window("before", load.since(t0))
            assert before.errors == 0, before.summary()
            contexts = iter(CONTEXTS * 1000)

            def victim_user_ranked() -> bool:
                page_type, device = next(contexts)  # a new context each time: never a cached answer
                body = httpx.get(
                    f"{app.url}/v1/recommendations/{on_victim[0]}",
                    params={"page_type": page_type, "device": device},
                    timeout=5,
                ).json()
                return bool(body["source"] == "realtime")

            assert victim_user_ranked()
            victim.kill()
            killed = time.monotonic()
            promoted_s = poll(lambda: len(cluster.masters()) == 3, 30, "a replica promoted", every_s=0.1)
            resumed_s = poll(victim_user_ranked, 30, "reads of the failed master's slots", every_s=0.05)
            resumed_at = time.monotonic()
            during = figures.window("master dead until reads resumed", load.since(killed, resumed_at))
            assert during.errors == 0, during.summary()
            assert during.p99_ms < DEADLINE_MS + MARGIN_MS, during.summary()
            load.wait_for(int(2 * RATE), resumed_at)
            after = figures.window("after failover", load.since(resumed_at))
            assert after.errors == 0 and after.sources["popular"] <= 0.05 * after.count, after.summary()
            figures.facts.update(
                {
                    "replica promoted after": f"{promoted_s:.2f} s",
                    "reads resumed (realtime for a user on that master) after": f"{promoted_s + resumed_s:.2f} s",
                    "users on the failed master": f"{len(on_victim)} of {len(users(stack))}",
                }
            )
    finally:
        cluster.stop()
    figures.write()


def test_accepted_events_survive_a_redis_restart_and_a_down_redis_refuses_events(
    aof_redis: RedisServer, stack: Stack, triton: Any, tmp_path: Path
) -> None:
    figures = Figures(
        "redis_restart_events",
        "the only Redis (AOF, appendfsync everysec) SIGKILLed, then restarted from its AOF",
        "POST /v1/events one at a time, then reads",
        ".venv/bin/pytest -m faults -s tests/faults/test_redis_faults.py -k restart",
    )
    env = fault_env(stack, triton, RECSERVE_REDIS_URLS=aof_redis.url)
    restarted: RedisServer | None = None
    try:
        with (
            running_orchestrator(env, tmp_path / "app.log") as app,
            httpx.Client(timeout=5, headers=API_HEADERS) as client,
        ):
            accepted = []
            items = stack.exported.bundle.item_ids  # events name catalogue items (others are 422)
            for i in range(30):
                response = client.post(
                    f"{app.url}/v1/events", json={"user_id": str(i % 7), "item_id": items[i], "type": "click"}
                )
                assert response.status_code == 202, response.text
                accepted.append(response.json()["id"])
            aof_redis.kill()
            refused = client.post(
                f"{app.url}/v1/events", json={"user_id": "1", "item_id": items[1], "type": "purchase"}
            )
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
            assert refused.json()["detail"].startswith("event not stored")
            # Reads still answer, from memory (popular lists), while the only Redis is down.
            down_answer = client.get(f"{app.url}/v1/recommendations/3")
            assert down_answer.status_code == 200 and down_answer.json()["source"] == "popular"
            restarted = start_server(appendonly=True, port=aof_redis.port, folder=aof_redis.folder)
            back = time.monotonic()
            stored = stream_ids(restarted.url, keys.EVENTS_STREAM)
            assert set(accepted) <= stored, f"lost {sorted(set(accepted) - stored)}"

            def accepts_again() -> bool:
                body = {"user_id": "1", "item_id": items[1], "type": "view"}
                return client.post(f"{app.url}/v1/events", json=body).status_code == 202

            again_s = poll(accepts_again, 10, "events accepted after the restart")
            figures.facts.update(
                {
                    "events accepted before the kill": len(accepted),
                    "found in the stream after the restart": len(set(accepted) & stored),
                    "event while Redis down": f"{refused.status_code} Retry-After {refused.headers['Retry-After']}",
                    "accepting again after the restart": f"{again_s + (time.monotonic() - back - again_s):.2f} s",
                }
            )
            figures.lost = f"{len(set(accepted) - stored)} of {len(accepted)} accepted events"
    finally:
        if restarted is not None:
            restarted.kill()
    figures.write()
