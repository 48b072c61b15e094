"""Item rows kept in process (orchestrator/store/item_rows.py) over the real stores, on both topologies."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.store import keys
from orchestrator.store.backend import Backend, Command
from orchestrator.store.embeddings import RedisEmbeddingStore
from orchestrator.store.features import RedisFeatureStore
from orchestrator.store.item_rows import LocalItemEmbeddings, LocalItemFeatures, LocalRows
from orchestrator.store.versions import VersionInfo

pytestmark = pytest.mark.integration


async def test_item_rows_read_once_are_served_from_memory_and_users_from_redis(backend: Backend):
    embeddings = RedisEmbeddingStore(backend, VersionInfo("v1", 16, "fp16"))
    features = RedisFeatureStore(backend, "v1")
    ids = [str(i) for i in range(200)]
    matrix = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    rows = np.arange(600, dtype=np.int64).reshape(200, 3) % 50
    await embeddings.set_batch("item", ids, matrix)
    await features.set_rows("item", ids, rows)
    await embeddings.set_batch("user", ["u1"], matrix[:1])
    kept_embeddings = LocalItemEmbeddings(embeddings, LocalRows(1000, 60.0, "item_embeddings"))
    kept_features = LocalItemFeatures(features, LocalRows(1000, 60.0, "item_features"))

    first = await kept_embeddings.get_batch("item", ids[:150])
    first_rows = await kept_features.get_rows("item", ids[:150])
    # Redis loses the first 100 items: what was read is still served, what was not is reported missing.
    doomed = ids[:100]
    names = keys.embeddings("v1", "item", doomed) + [keys.features("v1", "item", i) for i in doomed]
    await backend.execute([Command("DEL", name) for name in names])
    asked = [*ids[50:], "ghost"]
    got, got_rows = await kept_embeddings.get_batch("item", asked), await kept_features.get_rows("item", asked)
    assert got.found.tolist() == [True] * 150 + [False]
    np.testing.assert_array_equal(got.matrix[:100], first.matrix[50:])
    np.testing.assert_array_equal(got.matrix[:150], matrix[50:].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got_rows.matrix[:150], rows[50:])
    np.testing.assert_array_equal(got_rows.matrix[:100], first_rows.matrix[50:])
    assert np.isnan(got.matrix[150]).all() and not got_rows.matrix[150].any()

    # Users are read from Redis every time.
    assert (await kept_embeddings.get_batch("user", ["u1"])).found.all()
    await backend.execute([Command("DEL", keys.embeddings("v1", "user", ["u1"])[0])])
    assert not (await kept_embeddings.get_batch("user", ["u1"])).found.any()
