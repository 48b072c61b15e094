from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from orchestrator.store import Recommendations, features, precomputed
from orchestrator.store.codec import EmbeddingCodec
from orchestrator.store.errors import CorruptValueError, ShapeError, StoreConfigError

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(dim=st.integers(1, 64), rows=st.integers(0, 8), dtype=st.sampled_from(["fp32", "fp16"]), data=st.data())
def test_round_trip_is_exact_for_fp32_and_within_fp16_rounding(dim: int, rows: int, dtype: str, data: st.DataObject):
    matrix = data.draw(hnp.arrays(np.float32, (rows, dim), elements=finite))
    codec = EmbeddingCodec(dim, dtype)
    values = codec.encode(matrix)
    assert all(len(v) == codec.value_bytes for v in values)
    keys = [f"k{i}" for i in range(rows)]
    decoded, found = codec.decode(keys, values)
    assert found.all() and decoded.dtype == np.float32
    if dtype == "fp32":
        np.testing.assert_array_equal(decoded, matrix)
    else:
        np.testing.assert_array_equal(decoded, matrix.astype(np.float16).astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(present=st.lists(st.booleans(), min_size=1, max_size=20))
def test_misses_are_reported_and_nan_never_zero(present: list[bool]):
    codec = EmbeddingCodec(4)
    encoded = codec.encode(np.ones((len(present), 4), dtype=np.float32))
    values = [v if p else None for v, p in zip(encoded, present, strict=True)]
    matrix, found = codec.decode([str(i) for i in range(len(present))], values)
    assert found.tolist() == present
    assert np.isnan(matrix[~found]).all() and (matrix[found] == 1).all()


def test_value_sizes_are_header_plus_payload():
    assert EmbeddingCodec(128, "fp32").value_bytes == 4 + 512
    assert EmbeddingCodec(128, "fp16").value_bytes == 4 + 256


def test_wrong_length_names_the_key_and_both_sizes():
    codec = EmbeddingCodec(8)
    with pytest.raises(CorruptValueError, match=r"'k1'.*expected 36 bytes \(fp32 x 8.*but found 20 bytes"):
        codec.decode(["k0", "k1"], [None, b"\xe5\x01\x08\x00" + b"\x00" * 16])


def test_other_dtype_or_dim_is_reported_from_the_header():
    fp16_values = EmbeddingCodec(16, "fp16").encode(np.zeros((1, 16), np.float32))
    with pytest.raises(CorruptValueError, match=r"expected 36 bytes \(fp32 x 8 .*but found 36 bytes \(fp16 x 16\)"):
        EmbeddingCodec(8, "fp32").decode(["k"], fp16_values)


def test_garbage_without_header_is_corrupt():
    with pytest.raises(CorruptValueError, match="no embedding header"):
        EmbeddingCodec(2, "fp32").decode(["k"], [b"x" * 12])


def test_non_finite_stored_values_are_corrupt():
    value = bytearray(EmbeddingCodec(2).encode(np.zeros((1, 2), np.float32))[0])
    value[4:8] = np.float32(np.nan).tobytes()
    with pytest.raises(CorruptValueError, match="expected finite floats, but found NaN/inf"):
        EmbeddingCodec(2).decode(["k"], [bytes(value)])


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.zeros((2, 3), np.float32), r"expected shape \[n, 4\], but found shape \[2, 3\]"),
        (np.zeros(4, np.float32), r"expected shape \[n, 4\], but found shape \[4\]"),
        (np.zeros((1, 4), np.int64), "expected a floating-point dtype, but found int64"),
        (np.full((1, 4), np.inf, np.float32), "expected finite values, but found 4 NaN/inf"),
    ],
)
def test_encode_rejects_bad_input(matrix: np.ndarray, message: str):
    with pytest.raises(ShapeError, match=message):
        EmbeddingCodec(4).encode(matrix)


def test_fp16_overflow_is_rejected_not_stored_as_inf():
    with pytest.raises(ShapeError, match=r"expected \|x\| <= 65504, but found max \|x\| 1e\+06"):
        EmbeddingCodec(2, "fp16").encode(np.array([[1e6, 0]], np.float32))


def test_codec_settings_are_validated():
    with pytest.raises(StoreConfigError, match=r"embedding dtype must be one of \['fp16', 'fp32'\], but found 'bf16'"):
        EmbeddingCodec(8, "bf16")
    with pytest.raises(StoreConfigError, match=r"embedding dim must be an integer in 1..65535, but found 0"):
        EmbeddingCodec(0)


def test_feature_rows_round_trip_and_misses_are_unknown():
    rows = np.array([[1, 2, 3], [4, 0, 21]], dtype=np.int64)
    values = features.encode_rows("user", rows)
    matrix, found = features.decode_rows("user", ["a", "b", "c"], [values[0], None, values[1]])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(matrix, [[1, 2, 3], [0, 0, 0], [4, 0, 21]])


def test_feature_rows_are_validated():
    with pytest.raises(ShapeError, match=r"item feature rows: expected shape \[n, 3\], but found shape \[1, 2\]"):
        features.encode_rows("item", np.zeros((1, 2), np.int64))
    with pytest.raises(ShapeError, match=r"expected vocabulary indices in 0..2\^31-1, but found -1..0"):
        features.encode_rows("user", np.array([[-1, 0, 0]]))
    with pytest.raises(CorruptValueError, match=r"expected 12 bytes \(3 x int32 user features\), but found 5 bytes"):
        features.decode_rows("user", ["k"], [b"12345"])


def test_recommendations_round_trip_and_corruption():
    recs = Recommendations(("1", "2"), (0.9, 0.5), "v1", 1700000000.0, {"ranker": "onnx"})
    assert precomputed.decode("k", precomputed.encode(recs)) == recs
    with pytest.raises(CorruptValueError, match=r"expected a JSON object with items, .* but found no scores"):
        precomputed.decode("k", b'{"items": [], "model_version": "v", "computed_at": 1}')
    with pytest.raises(CorruptValueError, match="expected a JSON object"):
        precomputed.decode("k", b"\x00garbage")
    with pytest.raises(ShapeError, match=r"expected one score per item \(2\), but found 1 scores"):
        precomputed.encode(Recommendations(("1", "2"), (0.9,), "v1", 0.0))
