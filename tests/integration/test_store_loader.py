"""The bulk loader: crash midway, rerun, and every key is there once with the right value."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from export.artifacts import Bundle, save_bundle
from export.cli_dataplane import DataPlaneError, add_commands
from export.load import LoadConfig, load
from orchestrator import schema
from orchestrator.store import Kind, keys, versions
from orchestrator.store.backend import Backend, Command
from orchestrator.store.cluster import ClusterBackend
from orchestrator.store.embeddings import RedisEmbeddingStore
from orchestrator.store.errors import VersionError
from orchestrator.store.features import RedisFeatureStore
from orchestrator.store.precomputed import RedisPrecomputedStore
from orchestrator.store.sharded import ShardedBackend
from tests.bundles import random_bundle
from tests.redis_harness import flush

pytestmark = pytest.mark.integration
CHUNK = 100


class Crash(Exception):
    pass


def crash_after(table: str, rows: int):
    def hook(done_table: str, done: int) -> None:
        if done_table == table and done >= rows:
            raise Crash(f"killed after {done} rows of {table}")

    return hook


async def all_keys(backend: Backend) -> list[str]:
    names: list[bytes] = []
    if isinstance(backend, ShardedBackend):
        for client in backend._clients.values():
            names.extend([k async for k in client.scan_iter(count=1000)])
    else:
        assert isinstance(backend, ClusterBackend)
        names.extend([k async for k in backend.client.scan_iter(count=1000)])
    return sorted(k.decode() for k in names)


async def check_everything_loaded(backend: Backend, bundle: Bundle, dtype: str) -> None:
    info = await versions.active(backend)
    assert info.version == bundle.model_version and info.dtype == dtype
    store = RedisEmbeddingStore(backend, info)
    tables: list[tuple[Kind, list[str], np.ndarray]] = [
        ("user", bundle.user_ids, bundle.user_embeddings),
        ("item", bundle.item_ids, bundle.item_embeddings),
    ]
    for kind, ids, table in tables:
        lookup = await store.get_batch(kind, ids)
        assert lookup.found.all()
        expected = table if dtype == "fp32" else table.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(lookup.matrix, expected)
    features = RedisFeatureStore(backend, info.version)
    np.testing.assert_array_equal((await features.get_rows("user", bundle.user_ids)).matrix, bundle.user_features)
    np.testing.assert_array_equal((await features.get_rows("item", bundle.item_ids)).matrix, bundle.item_features)
    assert await features.seen(bundle.user_ids) == [set(bundle.user_history[u]) for u in bundle.user_ids]
    # Per-user keys expire (renewed by the next load and by purchase events): nothing outlives its user.
    with_history = [u for u in bundle.user_ids if bundle.user_history[u]]
    ttls = (await backend.execute([Command("TTL", keys.seen(u)) for u in with_history])).values
    assert all(0 < t <= LoadConfig().seen_ttl_s for t in ttls), sorted(set(ttls))[:5]
    popular = await RedisPrecomputedStore(backend).get_popular(schema.GLOBAL_SEGMENT)
    assert popular is not None and list(popular.items) == bundle.popular[schema.GLOBAL_SEGMENT]

    history_users = sum(1 for u in bundle.user_ids if bundle.user_history[u])
    expected_keys = (
        2 * (len(bundle.user_ids) + len(bundle.item_ids))  # embeddings + feature rows
        + history_users
        + len(bundle.popular)
        + 1
        + 5
        + 1  # version metadata, five table checkpoints, the pointer
    )
    found_keys = await all_keys(backend)
    assert len(found_keys) == len(set(found_keys)) == expected_keys


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
async def test_loader_killed_midway_and_rerun_loads_everything_exactly_once(
    backend: Backend, tmp_path: Path, dtype: str
):
    bundle = random_bundle(tmp_path)
    cfg = LoadConfig(dtype=dtype, chunk_rows=CHUNK, progress=False)
    with pytest.raises(Crash, match="killed after 200 rows of item_embeddings"):
        await load(backend, bundle, cfg, on_chunk=crash_after("item_embeddings", 2 * CHUNK))
    with pytest.raises(VersionError, match="no pointer"):
        await versions.active(backend)  # a half-loaded version is never visible

    written: list[tuple[str, int]] = []
    report = await load(backend, bundle, cfg, on_chunk=lambda table, done: written.append((table, done)))
    assert report.skipped_rows["user_embeddings"] == len(bundle.user_ids)
    assert report.skipped_rows["item_embeddings"] == 2 * CHUNK
    assert ("user_embeddings", CHUNK) not in written and written[0] == ("item_embeddings", 3 * CHUNK)
    await check_everything_loaded(backend, bundle, dtype)

    rerun = await load(backend, bundle, cfg)  # a finished load is a no-op
    assert rerun.skipped_rows == rerun.rows
    await check_everything_loaded(backend, bundle, dtype)


async def test_resuming_with_another_dtype_is_refused(backend: Backend, tmp_path: Path):
    bundle = random_bundle(tmp_path)
    with pytest.raises(Crash):
        await load(backend, bundle, LoadConfig(chunk_rows=CHUNK, progress=False), crash_after("user_embeddings", 1))
    with pytest.raises(VersionError, match=r"expected fp32 x 8 to resume version 't-v1' as loaded, but found fp16 x 8"):
        await load(backend, bundle, LoadConfig(dtype="fp16", chunk_rows=CHUNK, progress=False))


async def test_loading_a_new_version_keeps_the_old_beside_it(backend: Backend, tmp_path: Path):
    cfg = LoadConfig(chunk_rows=CHUNK, progress=False)
    await load(backend, random_bundle(tmp_path, 50, 20, version="a-v1"), cfg)
    second = await load(backend, random_bundle(tmp_path, 50, 20, version="a-v2"), cfg)
    assert (second.previous, second.dropped_keys) == ("a-v1", 0)
    assert (await versions.read_meta(backend, "a-v1")).version == "a-v1"
    assert await versions.previous_name(backend) == "a-v1"
    assert await versions.rollback(backend) == ("a-v2", "a-v1")
    assert (await versions.active(backend)).version == "a-v1"


async def test_loading_a_new_version_switches_and_drops_the_old(backend: Backend, tmp_path: Path):
    cfg = LoadConfig(chunk_rows=CHUNK, progress=False, drop_previous=True)
    first = await load(backend, random_bundle(tmp_path, 50, 20, version="a-v1"), cfg)
    assert first.previous is None
    second = await load(backend, random_bundle(tmp_path, 50, 20, version="a-v2"), cfg)
    assert second.previous == "a-v1"
    assert second.dropped_keys == 2 * (50 + 20) + 1 + 5  # vectors, feature rows, metadata, checkpoints
    assert not [k for k in await all_keys(backend) if k.startswith(keys.version_prefix("a-v1"))]
    assert (await versions.active(backend)).version == "a-v2"


def test_cli_load_then_a_conflicting_reload_fails_with_an_export_error(shard_servers, tmp_path: Path):
    flush(shard_servers)
    save_bundle(random_bundle(tmp_path, 50, 20, version="cli-v1"))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    common = ["--bundle", str(tmp_path), "--redis", ",".join(s.url for s in shard_servers), "--no-progress"]
    args = parser.parse_args(["load", *common])
    assert args.func(args) == 0
    conflicting = parser.parse_args(["load", *common, "--dtype", "fp16"])
    with pytest.raises(DataPlaneError, match=r"expected fp32 x 8 to resume version 'cli-v1' .* another model version"):
        conflicting.func(conflicting)
