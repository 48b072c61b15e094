"""Embedding store round trips on both topologies, version switching, and corrupt data."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.store import keys, versions
from orchestrator.store.backend import Backend, Command
from orchestrator.store.cluster import ClusterBackend
from orchestrator.store.embeddings import RedisEmbeddingStore
from orchestrator.store.errors import CorruptValueError, VersionError
from orchestrator.store.versions import VersionInfo

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
async def test_round_trip_with_misses(backend: Backend, dtype: str):
    store = RedisEmbeddingStore(backend, VersionInfo("v1", 16, dtype))
    rng = np.random.default_rng(0)
    ids = [str(i) for i in range(300)]
    matrix = rng.normal(size=(300, 16)).astype(np.float32)
    await store.set_batch("item", ids, matrix)

    asked = ["nope", *ids[::-1], "also-missing"]
    got, found = await store.get_batch("item", asked)
    assert got.shape == (302, 16) and got.dtype == np.float32
    assert found.tolist() == [False, *[True] * 300, False]
    assert np.isnan(got[~found]).all()
    expected = matrix[::-1] if dtype == "fp32" else matrix[::-1].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got[found], expected)
    # A user with the same id is another entity.
    assert not (await store.get_batch("user", ids[:5])).found.any()


async def test_cluster_batch_spans_slots_and_nodes(clustered: ClusterBackend):
    store = RedisEmbeddingStore(clustered, VersionInfo("v1", 8))
    ids = [str(i) for i in range(200)]
    names = keys.embeddings("v1", "user", ids)
    assert len({clustered.client.keyslot(k) for k in names}) > 150
    assert len({clustered.node_name(k) for k in names}) == 3
    await store.set_batch("user", ids, np.eye(200, 8, dtype=np.float32))
    lookup = await store.get_batch("user", ids)
    assert lookup.found.all() and lookup.down == ()
    np.testing.assert_array_equal(lookup.matrix, np.eye(200, 8, dtype=np.float32))


async def test_new_version_loads_beside_the_old_switches_atomically_and_the_old_is_dropped(backend: Backend):
    old, new = VersionInfo("v1", 4), VersionInfo("v2", 4, "fp16")
    for info, value in ((old, 1.0), (new, 2.0)):
        await versions.write_meta(backend, info)
        await RedisEmbeddingStore(backend, info).set_batch("user", ["a", "b"], np.full((2, 4), value, np.float32))
    with pytest.raises(VersionError, match="expected an active version at 'dp:active', but found no pointer"):
        await versions.active(backend)
    assert await versions.switch(backend, "v1") is None
    assert await versions.switch(backend, "v2") == "v1"
    assert await versions.active(backend) == new

    with pytest.raises(VersionError, match="expected an inactive version to drop"):
        await versions.drop(backend, "v2")
    assert await versions.drop(backend, "v1", batch=1) == 3  # two vectors + the metadata
    assert not (await RedisEmbeddingStore(backend, old).get_batch("user", ["a", "b"])).found.any()
    current = await RedisEmbeddingStore(backend, new).get_batch("user", ["a", "b"])
    assert (current.matrix == 2.0).all()
    with pytest.raises(VersionError, match="expected metadata for version 'v9'"):
        await versions.switch(backend, "v9")


async def test_corrupt_and_wrong_dtype_values_raise_naming_the_key(backend: Backend):
    await RedisEmbeddingStore(backend, VersionInfo("v1", 4, "fp16")).set_batch("item", ["x"], np.ones((1, 4)))
    fp32_reader = RedisEmbeddingStore(backend, VersionInfo("v1", 4, "fp32"))
    with pytest.raises(CorruptValueError, match=r"'m:v1:emb:item:\{i:x\}'.*fp32 x 4.*but found 12 bytes \(fp16 x 4\)"):
        await fp32_reader.get_batch("item", ["x"])
    await backend.execute([Command("SET", keys.embedding("v1", "item", "y"), (b"garbage",))])
    with pytest.raises(CorruptValueError, match="but found 7 bytes"):
        await fp32_reader.get_batch("item", ["y"])
