"""Properties (hypothesis) of the pieces every request leans on: the embedding codec, the consistent-hash
ring, and the cache key builder (context allow-list, user ids in keys)."""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from orchestrator import schema
from orchestrator.recommender import CONTEXT_FIELDS, RequestContext
from orchestrator.store import keys
from orchestrator.store.codec import HEADER, EmbeddingCodec
from orchestrator.store.errors import CorruptValueError, StoreConfigError
from orchestrator.store.ring import HashRing

ID_ALPHABET = string.ascii_letters + string.digits + "._:@-"
valid_ids = st.text(ID_ALPHABET, min_size=1, max_size=64)
FP16_MAX = float(np.finfo(np.float16).max)


def matrices(dim: int, rows: int, bound: float) -> st.SearchStrategy[np.ndarray]:
    bound = float(np.float32(bound))  # representable at width 32, as hypothesis requires
    finite = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=32)
    return hnp.arrays(np.float32, (rows, dim), elements=finite)


# -- embedding codec ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(dim=st.integers(1, 48), rows=st.integers(1, 6), data=st.data())
def test_fp32_round_trip_is_bit_exact(dim: int, rows: int, data: st.DataObject) -> None:
    codec = EmbeddingCodec(dim, "fp32")
    matrix = data.draw(matrices(dim, rows, 3.0e38))
    decoded, found = codec.decode([f"k{i}" for i in range(rows)], codec.encode(matrix))
    assert found.all()
    np.testing.assert_array_equal(decoded.view(np.uint32), matrix.view(np.uint32))  # -0.0 stays -0.0


@settings(max_examples=60, deadline=None)
@given(dim=st.integers(1, 48), rows=st.integers(1, 6), data=st.data())
def test_fp16_round_trip_is_within_half_precision_rounding(dim: int, rows: int, data: st.DataObject) -> None:
    codec = EmbeddingCodec(dim, "fp16")
    matrix = data.draw(matrices(dim, rows, FP16_MAX * 0.999))
    decoded, _ = codec.decode([f"k{i}" for i in range(rows)], codec.encode(matrix))
    # fp16 keeps 11 significant bits: relative error <= 2**-11, absolute near zero (subnormals) 2**-25.
    np.testing.assert_allclose(decoded, matrix, rtol=2**-11, atol=2**-24)


@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from(["fp32", "fp16"]), dim=st.integers(1, 32), data=st.data())
def test_a_damaged_header_or_length_is_always_detected(dtype: str, dim: int, data: st.DataObject) -> None:
    codec = EmbeddingCodec(dim, dtype)
    (value,) = codec.encode(data.draw(matrices(dim, 1, 1000.0)))
    damage = data.draw(st.sampled_from(["header", "truncate", "extend"]))
    if damage == "header":
        at = data.draw(st.integers(0, HEADER.size - 1))
        byte = data.draw(st.integers(0, 255).filter(lambda b: b != value[at]))
        corrupt = value[:at] + bytes([byte]) + value[at + 1 :]
    elif damage == "truncate":
        corrupt = value[: data.draw(st.integers(0, len(value) - 1))]
    else:
        corrupt = value + data.draw(st.binary(min_size=1, max_size=16))
    with pytest.raises(CorruptValueError, match=r"value at 'key': expected"):
        codec.decode(["key"], [corrupt])


@settings(max_examples=60, deadline=None)
@given(dim=st.integers(1, 32), data=st.data())
def test_a_payload_that_decodes_to_nan_or_inf_is_detected(dim: int, data: st.DataObject) -> None:
    # Payload bytes carry no checksum (see docs/RELIABILITY.md): what the codec promises is that a value
    # never decodes to a non-finite vector, which would poison every score it touches.
    codec = EmbeddingCodec(dim, "fp32")
    (value,) = codec.encode(np.zeros((1, dim), dtype=np.float32))
    at = data.draw(st.integers(0, dim - 1))
    bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    payload = bytearray(value)
    payload[HEADER.size + 4 * at : HEADER.size + 4 * at + 4] = np.float32(bad).tobytes()
    with pytest.raises(CorruptValueError, match="expected finite floats, but found NaN/inf"):
        codec.decode(["key"], [bytes(payload)])


# -- consistent-hash ring -------------------------------------------------------------------------

KEYS = [keys.seen(str(i)) for i in range(6000)]
shard_lists = st.lists(st.text("abcdefghij0123456789", min_size=1, max_size=8), min_size=1, max_size=8, unique=True)


@settings(max_examples=25, deadline=None)
@given(shards=shard_lists, order=st.randoms(use_true_random=False))
def test_routing_is_deterministic_and_independent_of_shard_order(shards: list[str], order: object) -> None:
    shuffled = list(shards)
    order.shuffle(shuffled)  # type: ignore[attr-defined]
    ring, other = HashRing(shards), HashRing(shuffled)
    names = np.asarray(ring.shards)[ring.shard_indices(KEYS[:1000])]
    assert (names == np.asarray(other.shards)[other.shard_indices(KEYS[:1000])]).all()


@settings(max_examples=25, deadline=None)
@given(shards=shard_lists, new=st.text("klmnopqrstuvwxyz", min_size=1, max_size=8))
def test_adding_a_shard_moves_keys_only_to_it_and_about_one_in_n_plus_one(shards: list[str], new: str) -> None:
    assume(new not in shards)
    before = HashRing(shards).shard_indices(KEYS)  # indices: the old shards keep theirs, the new one is last
    after = HashRing([*shards, new]).shard_indices(KEYS)
    moved = after[before != after]
    assert set(moved.tolist()) <= {len(shards)}
    expected = len(KEYS) / (len(shards) + 1)
    assert 0.5 * expected <= len(moved) <= 1.6 * expected, (len(moved), expected)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 8), prefix=st.text("abcdef", min_size=1, max_size=4))
def test_load_is_balanced_within_bounds(n: int, prefix: str) -> None:
    # 160 virtual nodes per shard: every shard within +-35% of its fair share of 6000 keys.
    shards = [f"{prefix}-{k}" for k in range(n)]
    counts = np.bincount(HashRing(shards).shard_indices(KEYS), minlength=n)
    fair = len(KEYS) / n
    assert counts.min() >= 0.65 * fair and counts.max() <= 1.35 * fair, counts.tolist()


# -- cache key builder ----------------------------------------------------------------------------

contexts = st.tuples(st.sampled_from(schema.PAGE_TYPES[1:]), st.sampled_from(schema.DEVICES[1:]))
other_fields = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda name: name not in CONTEXT_FIELDS), st.text(max_size=20), max_size=6
)


@given(context=contexts, extra=other_fields, more=other_fields)
def test_fields_outside_the_allow_list_never_change_the_cache_key(
    context: tuple[str, str], extra: dict[str, str], more: dict[str, str]
) -> None:
    page_type, device = context
    allowed = {"page_type": page_type, "device": device}
    key = RequestContext(page_type, device).cache_key
    assert RequestContext.from_query(extra | allowed).cache_key == key
    assert RequestContext.from_query(more | allowed).cache_key == key


@given(a=contexts, b=contexts)
def test_distinct_contexts_never_share_a_cache_key(a: tuple[str, str], b: tuple[str, str]) -> None:
    assume(a != b)
    assert RequestContext(*a).cache_key != RequestContext(*b).cache_key


@given(value=st.text(max_size=20).filter(lambda v: v not in schema.PAGE_TYPES[1:]))
def test_unknown_context_values_are_refused_not_keyed(value: str) -> None:
    with pytest.raises(ValueError, match="page_type must be one of"):
        RequestContext.from_query({"page_type": value})


USER_KEY_BUILDERS = (keys.rec_cache, keys.generation, keys.seen, keys.session, keys.recs)


@given(user_id=valid_ids, other=valid_ids)
def test_user_keys_embed_a_validated_id_exactly_once_inside_its_hash_tag(user_id: str, other: str) -> None:
    for build in USER_KEY_BUILDERS:
        key = build(user_id)
        prefix = key[: key.index("{")]
        assert key == f"{prefix}{{u:{user_id}}}"  # nothing after the tag, nothing escaped or lost
        assert keys.hash_tag(key) == f"u:{user_id}"  # routed by the whole id, and only by it
        if other != user_id:
            assert build(other) != key  # injective: '}' ends the tag and never occurs in an id


@given(user_id=st.text(max_size=80).filter(lambda s: not (0 < len(s) <= 64 and set(s) <= set(ID_ALPHABET))))
def test_raw_input_outside_the_id_alphabet_never_becomes_a_key(user_id: str) -> None:
    for build in USER_KEY_BUILDERS:
        with pytest.raises(StoreConfigError, match=r"user id must match \[A-Za-z0-9._:@-\]\{1,64\}"):
            build(user_id)
