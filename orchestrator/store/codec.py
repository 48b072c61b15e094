"""Embedding values: a 4-byte header (magic, dtype code, dim) + little-endian floats.

The header costs nothing in practice: Redis stores a 512-byte fp32x128 payload in a 640-byte jemalloc
size class with or without it (sds header + terminator already push it past 512), and it turns "a value
from the wrong version or dtype" into a clear error instead of silently wrong vectors.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator.store.errors import CorruptValueError, ShapeError, StoreConfigError

MAGIC = 0xE5
HEADER = struct.Struct("<BBH")  # magic, dtype code, dim
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "fp32": (1, np.dtype("<f4")),
    "fp16": (2, np.dtype("<f2")),
}
_CODE_NAMES = {code: name for name, (code, _) in DTYPES.items()}
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class EmbeddingCodec:
    dim: int
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreConfigError("embedding dtype", f"must be one of {sorted(DTYPES)}", self.dtype)
        if not 1 <= self.dim <= 0xFFFF:
            raise StoreConfigError("embedding dim", "must be an integer in 1..65535", self.dim)

    @property
    def value_bytes(self) -> int:
        return HEADER.size + self.dim * DTYPES[self.dtype][1].itemsize

    @property
    def header(self) -> bytes:
        return HEADER.pack(MAGIC, DTYPES[self.dtype][0], self.dim)

    def describe(self) -> str:
        return f"{self.value_bytes} bytes ({self.dtype} x {self.dim} + {HEADER.size}-byte header)"

    def encode(self, matrix: np.ndarray) -> list[bytes]:
        """One value per row. Rejects the wrong width, non-finite values and fp16 overflow."""
        values = np.asarray(matrix)
        if values.ndim != 2 or values.shape[1] != self.dim:
            raise ShapeError("embedding matrix", f"shape [n, {self.dim}]", f"shape {list(values.shape)}")
        if values.dtype.kind != "f":
            raise ShapeError("embedding matrix", "a floating-point dtype", str(values.dtype))
        if not np.isfinite(values).all():
            raise ShapeError("embedding matrix", "finite values", f"{int((~np.isfinite(values)).sum())} NaN/inf")
        if self.dtype == "fp16" and values.size and float(np.abs(values).max()) > FP16_MAX:
            raise ShapeError("fp16 embeddings", f"|x| <= {FP16_MAX:g}", f"max |x| {float(np.abs(values).max()):g}")
        payload = np.ascontiguousarray(values, dtype=DTYPES[self.dtype][1]).view(np.uint8)
        rows = np.empty((values.shape[0], self.value_bytes), dtype=np.uint8)
        rows[:, : HEADER.size] = np.frombuffer(self.header, dtype=np.uint8)
        rows[:, HEADER.size :] = payload.reshape(values.shape[0], self.value_bytes - HEADER.size)
        blob = rows.tobytes()
        size = self.value_bytes
        return [blob[k : k + size] for k in range(0, len(blob), size)]

    def decode(self, keys: Sequence[str], values: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
        """float32 [n, dim] (NaN rows for misses) and the found mask; raises on any corrupt value."""
        if len(keys) != len(values):
            raise ShapeError("decode", f"{len(keys)} values (one per key)", f"{len(values)}")
        found = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        matrix = np.full((len(values), self.dim), np.nan, dtype=np.float32)
        present = [v for v in values if v is not None]
        if not present:
            return matrix, found
        size = self.value_bytes
        if any(len(v) != size for v in present):
            k = next(k for k, v in enumerate(values) if v is not None and len(v) != size)
            raise CorruptValueError(keys[k], self.describe(), self._describe_value(values[k] or b""))
        rows = np.frombuffer(b"".join(present), dtype=np.uint8).reshape(len(present), size)
        bad_header = (rows[:, : HEADER.size] != np.frombuffer(self.header, dtype=np.uint8)).any(axis=1)
        if bad_header.any():
            k = np.flatnonzero(found)[int(np.argmax(bad_header))]
            raise CorruptValueError(keys[k], self.describe(), self._describe_value(values[k] or b""))
        decoded = rows[:, HEADER.size :].copy().view(DTYPES[self.dtype][1]).astype(np.float32)
        if not np.isfinite(decoded).all():
            k = np.flatnonzero(found)[int(np.argmax(~np.isfinite(decoded).all(axis=1)))]
            raise CorruptValueError(keys[k], "finite floats", "NaN/inf")
        matrix[found] = decoded
        return matrix, found

    @staticmethod
    def _describe_value(value: bytes) -> str:
        if len(value) < HEADER.size:
            return f"{len(value)} bytes (too short for a header)"
        magic, code, dim = HEADER.unpack(value[: HEADER.size])
        if magic != MAGIC:
            return f"{len(value)} bytes with no embedding header (first byte 0x{magic:02x}, not 0x{MAGIC:02x})"
        return f"{len(value)} bytes ({_CODE_NAMES.get(code, f'dtype code {code}')} x {dim})"
