from __future__ import annotations

import pytest

from orchestrator.store import keys
from orchestrator.store.errors import StoreConfigError


def test_entity_keys_carry_version_and_share_the_entity_hash_tag():
    user_keys = [
        keys.embedding("v7", "user", "42"),
        keys.features("v7", "user", "42"),
        keys.seen("42"),
        keys.session("42"),
        keys.recs("42"),
    ]
    assert user_keys[0] == "m:v7:emb:user:{u:42}"
    assert {keys.hash_tag(k) for k in user_keys} == {"u:42"}
    assert keys.hash_tag(keys.embedding("v7", "item", "42")) == "i:42"
    assert keys.embedding("v7", "user", "42").startswith(keys.version_prefix("v7"))


def test_version_scoped_keys_all_match_the_version_pattern_and_no_other():
    pattern_prefix = keys.version_pattern("v1")[:-1]
    for key in (keys.embedding("v1", "item", "9"), keys.version_meta("v1"), keys.checkpoint("v1", "load:x")):
        assert key.startswith(pattern_prefix)
    assert not keys.embedding("v10", "item", "9").startswith(pattern_prefix)
    assert not keys.seen("9").startswith("m:")


def test_hash_tag_follows_the_redis_cluster_rule():
    assert keys.hash_tag("plain") == "plain"
    assert keys.hash_tag("a{}b{c}") == "a{}b{c}"  # empty first tag: the whole key counts
    assert keys.hash_tag("x{abc}y{z}") == "abc"


@pytest.mark.parametrize("version", ["", "v*", "v 1", "a{b}", "x" * 65])
def test_versions_that_could_widen_a_scan_pattern_are_rejected(version: str):
    with pytest.raises(StoreConfigError, match=r"model version must match \[A-Za-z0-9._-\]\{1,64\}"):
        keys.version_pattern(version)


def test_ids_with_braces_are_rejected():
    with pytest.raises(StoreConfigError, match=r"user id must match \[A-Za-z0-9._:@-\]\{1,64\}, but found 'a\}b'"):
        keys.seen("a}b")
