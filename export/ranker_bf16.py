"""The factored ranker (``export.ranker_factored``) with its big product in bf16: pre-compute's ``--ranker bf16``,
for CPUs that multiply bf16 natively.

Nearly all of the factored ranker's arithmetic is one product per user: the candidates' rows ``[i, item
features]`` [n, 152] times the user's matrix [152, 1155] (``FactoredRanker.split_rows``). A core with bf16
dot-product instructions (``avx512_bf16``: Zen 4 and later, Cooper Lake; AMX: Sapphire Rapids and later)
runs that product about twice as fast in bf16 as in fp32. ONNX Runtime's CPU provider has no bf16 kernels,
so this scorer runs in torch (the export extra; the jobs image carries it), ``users_per_call`` users per
batched product. That product and the 256 -> 64 deep layer take bf16 inputs (8 bits of mantissa) and give
bf16 outputs (fp32 sums inside); the user's own part, the cross terms and the head stay fp32.

What the rounding costs, measured (docs/BENCHMARKS.md, "Pre-compute in bf16"): scores move by ~4e-4 (median;
5e-3 at most on a ranker trained on MovieLens 100K), so items whose scores are that close can swap. A user's
top 50 keeps 99.9% of its items, and the lists' recall@50 and NDCG@50 on held-out interactions are the fp32
lists' to the third decimal; the order is the fp32 order only where neighbours differ by more than that.
``check_bf16`` bounds the difference on the job's own rows before anything is written.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.ranker_factored import FactoredRanker, max_score_diff

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# /proc/cpuinfo flags of a core with native bf16 dot products; without them torch emulates bf16, slower than
# fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Largest |score - fp32 score| accepted on the parity rows: 6x the largest measured there (1.6e-3, a ranker
# trained on MovieLens 100K; every candidate of its 943 users moved 4.7e-3 at most). A model whose scores move
# more than this in bf16 keeps fp32 (``--ranker factored``).
BF16_TOLERANCE = 1e-2


class Bf16ToleranceError(ValueError):
    """The ranker's scores move more than ``BF16_TOLERANCE`` when its big product runs in bf16."""

    def __init__(self, max_abs_diff: float, tolerance: float) -> None:
        super().__init__(
            f"expected bf16 scores within {tolerance:g} of the fp32 model's, but found max |diff| "
            f"{max_abs_diff:.3g}: this model is too sensitive to bf16 rounding; run pre-compute with "
            "--ranker factored (fp32)"
        )


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this machine's cores multiply bf16 natively (Linux's cpuinfo flags; False where unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    found = re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)
    flags = set(found.group(1).split()) if found else set()
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def _embed(tables: list[np.ndarray], features: np.ndarray) -> np.ndarray:
    """The feature embeddings side by side, indices clamped as the model clamps them."""
    return np.concatenate([t[np.clip(features[..., k], 0, len(t) - 1)] for k, t in enumerate(tables)], axis=-1)


class Bf16Scorer:
    """``FactoredScorer``'s arithmetic (``export.ranker_factored``) in torch, the [n, 152] x [152, 1155] product
    and the 256 -> 64 layer in bf16; the same ``score``."""

    def __init__(self, ranker: FactoredRanker, context: np.ndarray, users_per_call: int = 4) -> None:
        import torch

        self._torch = torch
        groups = ranker.column_groups()
        fixed, scaled, w_user = ranker.split_rows(np.concatenate([w for w, _ in groups.values()], axis=1))
        # Row-major copies: the column-gathered weights are column-major, and addcmul over a column-major pair
        # ran about 7x slower per user.
        self.fixed = torch.from_numpy(np.ascontiguousarray(fixed)).bfloat16()
        self.scaled = torch.from_numpy(np.ascontiguousarray(scaled)).bfloat16()
        self.sizes = [w.shape[1] for w, _ in groups.values()]
        self.ranker = ranker
        dim, n_uf = ranker.blocks.dim, 8 * len(ranker.user_tables)
        # x_user @ w_user + bias, x_user = [u, user features, context]: the context's share is the job's.
        self.context_fe = _embed(ranker.context_tables, np.asarray(context, dtype=np.int64).reshape(1, -1))[0]
        user_bias = np.concatenate([b for _, b in groups.values()]) + self.context_fe @ w_user[dim + n_uf :]
        self.user_bias = torch.from_numpy(user_bias.astype(np.float32))
        self.w_user_u = torch.from_numpy(np.ascontiguousarray(w_user[:dim]))
        self.w_user_uf = torch.from_numpy(np.ascontiguousarray(w_user[dim : dim + n_uf]))
        self.context_t = torch.from_numpy(self.context_fe.astype(np.float32))
        self.d2t = torch.from_numpy(np.ascontiguousarray(ranker.d2t)).bfloat16()
        self.c2 = torch.from_numpy(ranker.c2.copy())
        self.h_d = torch.from_numpy(ranker.h_d.copy())
        self.users_per_call = users_per_call

    def score(
        self,
        user_embeddings: np.ndarray,
        user_features: np.ndarray,
        item_embeddings: np.ndarray,
        item_features: np.ndarray,
        candidates: np.ndarray,
    ) -> np.ndarray:
        """float32 [n_users, n] scores of each user's ``candidates`` [n_users, n] (rows of the item tables); a
        slot of -1 gets a meaningless score, for the caller to mask."""
        torch = self._torch
        out = np.empty(candidates.shape, dtype=np.float32)
        items = np.maximum(candidates, 0)
        # The feature embeddings of the whole call at once: per chunk, numpy's per-call cost would dominate.
        user_fe = _embed(self.ranker.user_tables, np.asarray(user_features)).astype(np.float32)
        item_fe = _embed(self.ranker.item_tables, np.asarray(item_features)[items]).astype(np.float32)
        with torch.inference_mode():
            for lo in range(0, len(candidates), self.users_per_call):
                part = slice(lo, lo + self.users_per_call)
                out[part] = self._score(
                    torch.from_numpy(np.ascontiguousarray(user_embeddings[part], dtype=np.float32)),
                    torch.from_numpy(user_fe[part]),
                    torch.from_numpy(np.ascontiguousarray(item_embeddings[items[part]], dtype=np.float32)),
                    torch.from_numpy(item_fe[part]),
                ).numpy()
        return out

    def _score(self, u: torch.Tensor, user_fe: torch.Tensor, i: torch.Tensor, item_fe: torch.Tensor) -> torch.Tensor:
        """Scores [B, n] of u [B, dim], user_fe [B, 8 x user features], i [B, n, dim], item_fe [B, n, 8 x item
        features]: the steps of ``factored_graph``, B users at a time."""
        torch = self._torch
        n_users = len(u)
        # The user's matrix fixed + diag([u, 0]) scaled, and the candidates' rows, each rounded to bf16 once.
        u_padded = torch.cat([u, u.new_zeros(n_users, item_fe.shape[-1])], dim=1).bfloat16()
        m_user = torch.addcmul(self.fixed, u_padded[:, :, None], self.scaled)
        x = torch.cat([i, item_fe], dim=2).bfloat16()
        h = torch.bmm(x, m_user).float()
        h += (u @ self.w_user_u + user_fe @ self.w_user_uf + self.user_bias)[:, None, :]
        h1_row, h1_user, v_row, v_user, deep, hb2 = torch.split(h, self.sizes, dim=2)
        # The cross part, x0 . (h1 * v) + h_x . b2: the row's columns against the row's x0, the user's against
        # the user's.
        u_times_i = i * u[:, None, :]
        x_row = torch.cat([i, u_times_i, u_times_i.sum(dim=2, keepdim=True), item_fe], dim=2)
        x_user = torch.cat([u, user_fe, self.context_t.expand(n_users, -1)], dim=1)
        cross = (h1_row * v_row * x_row).sum(dim=2) + (h1_user * v_user * x_user[:, None, :]).sum(dim=2)
        deep = torch.relu(torch.relu(deep).bfloat16() @ self.d2t + self.c2) @ self.h_d
        return torch.sigmoid(cross + hb2[..., 0] + deep + self.ranker.head_bias)


def check_bf16(scorer: Bf16Scorer, reference: np.ndarray, rows: dict[str, np.ndarray]) -> float:
    """``max_score_diff`` against ``reference`` (the fp32 scores of the same rows, one user per row, given as the
    ranker's named tensors); raises ``Bf16ToleranceError`` past ``BF16_TOLERANCE``."""
    diff = max_score_diff(scorer.score, reference, rows)
    if not diff <= BF16_TOLERANCE:
        raise Bf16ToleranceError(diff, BF16_TOLERANCE)
    return diff


def warn_unless_native() -> None:
    """Log that bf16 is emulated here (slower than fp32), where the CPU has no native bf16."""
    if not native_bf16():
        log.warning(
            "--ranker bf16 on a CPU without %s: torch emulates bf16 here, slower than fp32 (--ranker factored)",
            " or ".join(NATIVE_BF16_FLAGS),
        )
