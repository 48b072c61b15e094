"""The shipped ranker's arithmetic regrouped for pre-compute: the same scores with a third of the work.

Pre-compute ranks ``n_candidates`` items for each user, so every user's row of the ranker input repeats
``n_candidates`` times, and every popular item's row once per user who gets it. The DCN ranker
(``export.models.Ranker``) spends nearly all of its time in three matrix products of its input
``x0 = [u, i, u*i, u.i, user features, item features, context]`` (449 wide at dim 128): ``W1 x0`` (cross 1),
``W2 x1`` (cross 2) and ``D1 x0`` (deep 1), about 1.07 MFLOP per (user, item) row, which ONNX Runtime runs
at this CPU's fp32 peak (measured: 81-87K rows/s per core, 2.35 ms per user at 200 candidates, 77-96%
of the job's time). Two identities make most of it per-user or per-item work:

- ``x0 W^T`` is a sum over x0's column blocks: the user and context blocks are one product per user, and
  for a fixed user the ``i``, ``u*i`` and ``u.i`` blocks are all linear in ``i``:
  ``i W_i + (u*i) W_p + (u.i) w = i (W_i + diag(u) (W_p + w))``, one matrix per user.
- Cross 2 enters the score only through the head: ``h . x2 = (h * x0) . (W2 x1 + b2) + h . x1``, and
  ``(h * x0) . (W2 x1) = x1 . (x0 A)`` with ``A = diag(h) W2``: a product of x0 again, which splits the same
  way, instead of a full 449 x 449 product of x1.

Per row that leaves one [dim + 8 x item features + 1] x [.., 1155] product (all of x0 @ [W1, A, D1] and the
head's ``h * b2`` term) and the 256 -> 64 deep layer: about 0.38 MFLOP, a single GEMM per user over the user's
candidates. The weights are read from the exported ONNX file that serving uses,
and ``check_parity`` compares this against ONNX Runtime on the job's own rows before anything is written.
Floating-point sums run in another order, so scores differ in the last bits (measured max |diff| ~1e-7):
lists are equal up to the order of items whose scores tie within that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator import schema


class FactoredParityError(ValueError):
    """The regrouped ranker disagrees with ONNX Runtime: the model is not the architecture it assumes."""

    def __init__(self, max_abs_diff: float, tolerance: float) -> None:
        super().__init__(
            f"expected the factored ranker to match ONNX Runtime within {tolerance:g}, but found max |diff| "
            f"{max_abs_diff:.3g}; the model is not export.models.Ranker as this module assumes: run pre-compute "
            "with --ranker onnx"
        )


@dataclass(frozen=True)
class _Blocks:
    """Column ranges of x0 (export.models.Ranker.forward's concatenation order)."""

    dim: int
    n_user_features: int
    n_item_features: int
    n_context: int

    @property
    def u(self) -> slice:
        return slice(0, self.dim)

    @property
    def i(self) -> slice:
        return slice(self.dim, 2 * self.dim)

    @property
    def p(self) -> slice:
        return slice(2 * self.dim, 3 * self.dim)

    @property
    def dot(self) -> int:
        return 3 * self.dim

    @property
    def uf(self) -> slice:
        start = 3 * self.dim + 1
        return slice(start, start + 8 * self.n_user_features)

    @property
    def itf(self) -> slice:
        start = self.uf.stop
        return slice(start, start + 8 * self.n_item_features)

    @property
    def ctx(self) -> slice:
        start = self.itf.stop
        return slice(start, start + 8 * self.n_context)

    @property
    def user_columns(self) -> np.ndarray:
        """x0's columns that are the same on every row of one user's request: u, user features, context."""
        return np.r_[np.arange(self.u.start, self.u.stop), np.arange(self.uf.start, self.uf.stop), _range(self.ctx)]


def _range(block: slice) -> np.ndarray:
    return np.arange(block.start, block.stop)


def _embed(tables: list[np.ndarray], columns: np.ndarray) -> np.ndarray:
    """The feature embeddings, indices clamped as the model clamps them."""
    return np.concatenate(
        [t[np.clip(columns[:, k], 0, len(t) - 1)] for k, t in enumerate(tables)], axis=1, dtype=np.float32
    )


class FactoredRanker:
    """Scores (user, item) pairs of a fixed context with the regrouped arithmetic (module docstring)."""

    def __init__(self, weights: dict[str, np.ndarray], context: np.ndarray) -> None:
        w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        self.user_tables = [w[f"user_feature_embeddings.{k}.weight"] for k in range(len(schema.USER_FEATURES))]
        self.item_tables = [w[f"item_feature_embeddings.{k}.weight"] for k in range(len(schema.ITEM_FEATURES))]
        self.context_tables = [w[f"context_embeddings.{k}.weight"] for k in range(len(schema.CONTEXT_FEATURES))]
        w1, b1 = w["cross.0.linear.weight"], w["cross.0.linear.bias"]
        w2, b2 = w["cross.1.linear.weight"], w["cross.1.linear.bias"]
        d1, c1 = w["deep.0.weight"], w["deep.0.bias"]
        self.d2t, self.c2 = np.ascontiguousarray(w["deep.2.weight"].T), w["deep.2.bias"]
        head, self.head_bias = w["head.weight"].reshape(-1), float(w["head.bias"].reshape(-1)[0])
        width = w1.shape[0]
        if "cross.2.linear.weight" in w or w1.shape != (width, width) or head.shape[0] != width + len(self.c2):
            raise FactoredParityError(float("inf"), 0.0)
        self.width = width
        self.h_x, self.h_d = head[:width], head[width:]
        dim = (width - 1 - 8 * (len(self.user_tables) + len(self.item_tables) + len(self.context_tables))) // 3
        self.blocks = _Blocks(dim, len(self.user_tables), len(self.item_tables), len(self.context_tables))
        # x0 @ wcat = [x0 W1^T, x0 A, x0 D1^T], A = diag(h_x) W2: [width, 2 * width + deep].
        self.wcat = np.ascontiguousarray(np.concatenate([w1.T, self.h_x[:, None] * w2, d1.T], axis=1))
        # Biases folded into the per-user part: b1 + 1 (x1 = x0 * (W1 x0 + b1) + x0 = x0 * h1), h_x (the
        # head's x1 . h_x term joins x1 . v), c1.
        self.bias = np.concatenate([b1 + 1.0, self.h_x, c1]).astype(np.float32)
        self.hb2 = (self.h_x * b2).astype(np.float32)
        self.context = _embed(self.context_tables, np.asarray(context, np.int64).reshape(1, -1))[0]
        self.layout = _ScoreLayout.of(self)

    @classmethod
    def from_onnx(cls, path: Path, context: np.ndarray) -> FactoredRanker:
        """The weights of an ONNX export of ``export.models.Ranker`` (its parameter names)."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        return cls({t.name: numpy_helper.to_array(t) for t in model.graph.initializer}, context)

    def item_feature_rows(self, features: np.ndarray) -> np.ndarray:
        """float32 [n, 8 x item features]: the items' feature embeddings (the ``item_feature_rows`` of ``score``)."""
        return _embed(self.item_tables, np.asarray(features, np.int64))

    def score(
        self,
        user_embeddings: np.ndarray,
        user_features: np.ndarray,
        item_embeddings: np.ndarray,
        item_feature_rows: np.ndarray,
        candidates: np.ndarray,
    ) -> np.ndarray:
        """float32 [n_users, n] scores of each user's ``candidates`` [n_users, n] (rows of ``item_embeddings``
        and of ``item_feature_rows``, the latter from ``item_feature_rows``); a slot of -1 gets a meaningless
        score, for the caller to mask.

        One user at a time: the user's matrix ``M = [W_i + diag(u) (W_p + w_dot); W_itf; user part]`` (the u*i
        and u.i blocks are linear in i for a fixed u) turns every candidate's x0 @ wcat into one [dim + 8 x item
        features + 1] x [.., N] product of its own row ``[i, item features, 1]``, a single GEMM of the user's
        candidates that stays in cache with its output."""
        lay = self.layout
        dim, width, n_if = self.blocks.dim, self.width, lay.n_item_fe
        n_users, n = candidates.shape
        user_embeddings = np.asarray(user_embeddings, np.float32)
        user_fe = _embed(self.user_tables, np.asarray(user_features, np.int64))
        x_user = np.concatenate(
            [user_embeddings, user_fe, np.broadcast_to(self.context, (n_users, len(self.context)))], axis=1
        ).astype(np.float32)
        user_part = x_user @ lay.w_user + lay.bias  # [n_users, N]: the user's own blocks and the biases
        rows = np.maximum(candidates, 0)  # -1: any item, its score is masked
        out = np.empty((n_users, n), dtype=np.float32)
        # Buffers reused by every user: the user's matrix (its item-feature rows set once), the candidates' rows
        # [i, item features, 1], the product and h1 * v.
        m = np.empty((lay.k, lay.n), dtype=np.float32)
        m[dim : dim + n_if] = lay.w_itf
        x = np.empty((n, lay.k), dtype=np.float32)
        x[:, -1] = 1.0
        h = np.empty((n, lay.n), dtype=np.float32)
        t = np.empty((n, width), dtype=np.float32)
        i, item_fe = x[:, :dim], x[:, dim : dim + n_if]
        g, hb2_term, h1, v = h[:, : lay.deep], h[:, lay.deep], h[:, lay.h1], h[:, lay.v]
        t_i, t_p, t_itf, t_dot, t_user = (t[:, s] for s in lay.t_blocks)
        for k in range(n_users):
            u = user_embeddings[k]
            np.multiply(lay.w_pd, u[:, None], out=m[:dim])
            m[:dim] += lay.w_i
            m[-1] = user_part[k]
            np.take(item_embeddings, rows[k], axis=0, out=i)
            np.take(item_feature_rows, rows[k], axis=0, out=item_fe)
            np.matmul(x, m, out=h)
            # The cross part of the logit, x0 . (h1 * v) + x0 . (h_x * b2), block by block of x0: the user's
            # blocks are constant, u*i = u * i and u.i = i . u.
            np.multiply(h1, v, out=t)
            logit = t_user @ x_user[k]
            t_p *= u
            t_i += t_p
            logit += np.einsum("ij,ij->i", t_i, i)
            logit += np.einsum("ij,ij->i", t_itf, item_fe)
            logit += t_dot * (i @ u)
            logit += hb2_term
            np.maximum(g, 0, out=g)
            deep = g @ self.d2t
            deep += self.c2
            np.maximum(deep, 0, out=deep)
            logit += deep @ self.h_d
            logit += self.head_bias
            out[k] = 1.0 / (1.0 + np.exp(-logit))
        return out


@dataclass(frozen=True)
class _ScoreLayout:
    """``FactoredRanker.score``'s weights: wcat's columns (plus h_x * b2 as one more) reordered as
    [deep layer 1, the h_x * b2 term, h1, v], with h1's and v's columns in the order [i, u*i, item features, u.i,
    the user's blocks (u, user features, context)], and its rows split by what they multiply."""

    w_i: np.ndarray  # [dim, N]: rows of the i block
    w_pd: np.ndarray  # [dim, N]: rows of the u*i block plus the u.i row (both scale by u)
    w_itf: np.ndarray  # [8 x item features, N]
    w_user: np.ndarray  # [user blocks' width, N]
    bias: np.ndarray  # [N]
    deep: int
    n_item_fe: int
    h1: slice
    v: slice
    t_blocks: tuple[slice, slice, slice, int, slice]  # i, u*i, item features, u.i, user: columns of h1 * v

    @property
    def k(self) -> int:
        return len(self.w_i) + self.n_item_fe + 1

    @property
    def n(self) -> int:
        return self.w_i.shape[1]

    @classmethod
    def of(cls, ranker: FactoredRanker) -> _ScoreLayout:
        b, width = ranker.blocks, ranker.width
        dim, n_if = b.dim, b.itf.stop - b.itf.start
        user = b.user_columns
        order = np.r_[_range(b.i), _range(b.p), _range(b.itf), [b.dot], user]
        deep = ranker.wcat.shape[1] - 2 * width
        wext = np.concatenate([ranker.wcat, ranker.hb2[:, None]], axis=1)
        bias = np.concatenate([ranker.bias, [0.0]]).astype(np.float32)
        columns = np.r_[np.arange(2 * width, 2 * width + deep), [2 * width + deep], order, width + order]
        w, bias = wext[:, columns], bias[columns]
        h1 = slice(deep + 1, deep + 1 + width)
        n_row = 2 * dim + n_if + 1
        return cls(
            w_i=np.ascontiguousarray(w[b.i]),
            w_pd=np.ascontiguousarray(w[b.p] + w[b.dot][None, :]),
            w_itf=np.ascontiguousarray(w[b.itf]),
            w_user=np.ascontiguousarray(w[user]),
            bias=np.ascontiguousarray(bias, dtype=np.float32),
            deep=deep,
            n_item_fe=n_if,
            h1=h1,
            v=slice(h1.stop, h1.stop + width),
            t_blocks=(
                slice(0, dim),
                slice(dim, 2 * dim),
                slice(2 * dim, 2 * dim + n_if),
                n_row - 1,
                slice(n_row, width),
            ),
        )


def check_parity(
    factored: FactoredRanker, run: object, tensors: dict[str, np.ndarray], tolerance: float = 1e-5
) -> float:
    """Max |score diff| against ``run`` (ONNX Runtime) on rows given as the ranker's named tensors (one
    user per row); raises ``FactoredParityError`` past ``tolerance``."""
    ours = factored.score(
        tensors["user_embedding"],
        tensors["user_features"],
        tensors["item_embedding"],
        factored.item_feature_rows(tensors["item_features"]),
        np.arange(len(tensors["item_embedding"])).reshape(-1, 1),
    ).reshape(-1)
    reference = np.asarray(run(tensors), dtype=np.float32).reshape(-1)  # type: ignore[operator]
    diff = float(np.abs(ours - reference).max(initial=0.0))
    if not diff <= tolerance:
        raise FactoredParityError(diff, tolerance)
    return diff


# The cpu profile's Triton model (export/triton_python_backend/model.py) scores a request whose rows are all
# one user's candidates with this graph, written beside model.onnx by export.model_repository.
FACTORED_FILE = "model_factored.onnx"
# Inputs whose rows are the user's (or the request's context): the graph takes them once, as [1, width].
ONE_ROW_INPUTS = ("user_embedding", "user_features", "context_features")


class _GraphBuilder:
    """Nodes and initializers of an ONNX graph, named in order."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        # np.ascontiguousarray would make a scalar (Gather's index) a vector of one.
        self.initializers.append(numpy_helper.from_array(value if value.flags.c_contiguous else value.copy(), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attributes: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [output], **attributes))
        return output

    def columns(self, x: str, start: int, stop: int, name: str, axis: int = 1) -> str:
        bounds = [self.const(f"{name}_{k}", np.array([v], np.int64)) for k, v in (("from", start), ("to", stop))]
        return self.op("Slice", [x, *bounds, self.const(f"{name}_axis", np.array([axis], np.int64))], name)

    def embed(self, prefix: str, features: str, tables: list[np.ndarray]) -> str:
        """The feature embeddings side by side, indices clamped as the model clamps them."""
        parts = []
        for k, table in enumerate(tables):
            column = self.op(
                "Gather", [features, self.const(f"{prefix}_col{k}", np.array(k, np.int64))], f"{prefix}_{k}", axis=1
            )
            low, high = np.array(0, np.int64), np.array(len(table) - 1, np.int64)
            clamped = self.op(
                "Clip",
                [column, self.const(f"{prefix}_lo{k}", low), self.const(f"{prefix}_hi{k}", high)],
                f"{prefix}_c{k}",
            )
            parts.append(
                self.op("Gather", [self.const(f"{prefix}_table{k}", table), clamped], f"{prefix}_e{k}", axis=0)
            )
        return self.op("Concat", parts, f"{prefix}_embedded", axis=1)


def factored_graph(ranker: FactoredRanker, opset: int = 17) -> Any:
    """``ranker``'s regrouped arithmetic (module docstring) as an ONNX model for one user's candidates: the
    inputs of ``ONE_ROW_INPUTS`` take one row, the item inputs one per candidate, and the output is the
    exported model's ``score`` [n, 1]. The user's part of every product is computed once; per candidate, one
    [dim + 8 x item features] row times the user's matrices, and the 256 -> 64 layer.

    The columns of x0 @ wcat are computed in the groups the score reads them in, each by its own Gemm of the
    candidates' rows ``[i, item features]`` with the user's matrix for that group and the user's own part as
    the bias: h1's and v's columns of the row's blocks (i, u*i, u.i, item features), h1's and v's columns of the
    user's blocks, deep layer 1, and the head's h_x * b2 term. No product is sliced afterwards."""
    from onnx import TensorProto, helper

    b, width = ranker.blocks, ranker.width
    g = _GraphBuilder()
    ue, ie, uf, itf, cf = "user_embedding", "item_embedding", "user_features", "item_features", "context_features"
    user_fe = g.embed("uf", uf, ranker.user_tables)
    item_fe = g.embed("if", itf, ranker.item_tables)
    context_fe = g.embed("cf", cf, ranker.context_tables)
    user_columns = b.user_columns
    row_columns = np.r_[_range(b.i), _range(b.p), [b.dot], _range(b.itf)]
    wcat, bias = ranker.wcat, ranker.bias
    deep_columns = np.arange(2 * width, wcat.shape[1])
    groups = {
        "h1_row": (wcat[:, row_columns], bias[row_columns]),
        "h1_user": (wcat[:, user_columns], bias[user_columns]),
        "v_row": (wcat[:, width + row_columns], bias[width + row_columns]),
        "v_user": (wcat[:, width + user_columns], bias[width + user_columns]),
        "deep": (wcat[:, deep_columns], bias[deep_columns]),
        "hb2": (ranker.hb2[:, None], np.zeros(1, np.float32)),
    }
    x_user = g.op("Concat", [ue, user_fe, context_fe], "x_user", axis=1)
    x = g.op("Concat", [ie, item_fe], "x", axis=1)
    # i W_i + (u * i) W_p + (u . i) w = i (W_i + diag(u) (W_p + w)): the user's matrix, made once per request,
    # with the item-feature rows (W_itf) below it; u is padded with zeros so one Mul scales only the i rows.
    n_item_fe = b.itf.stop - b.itf.start
    padding = g.const("item_fe_zeros", np.zeros((1, n_item_fe), np.float32))
    u_padded = g.op("Transpose", [g.op("Concat", [ue, padding], "u_padded_row", axis=1)], "u_padded", perm=[1, 0])
    h = {}
    for name, (w, group_bias) in groups.items():
        fixed = np.concatenate([w[b.i], w[b.itf]], axis=0)
        scaled = np.concatenate([w[b.p] + w[b.dot][None, :], np.zeros((n_item_fe, w.shape[1]), np.float32)], axis=0)
        m_user = g.op("Mul", [g.const(f"scaled_{name}", scaled), u_padded], f"scaled_u_{name}")
        m_user = g.op("Add", [g.const(f"fixed_{name}", fixed), m_user], f"m_user_{name}")
        user_part = g.op("MatMul", [x_user, g.const(f"w_user_{name}", w[user_columns])], f"u0_{name}")
        user_part = g.op("Add", [user_part, g.const(f"bias_{name}", group_bias.reshape(1, -1))], f"user_{name}")
        h[name] = g.op("Gemm", [x, m_user, user_part], f"h_{name}")
    # The cross part of the logit, x0 . (h1 * v) + x0 . (h_x * b2): the row's columns against the row's x0, the
    # user's against the user's.
    product = g.op("Mul", [ue, ie], "u_times_i")
    dot = g.op("ReduceSum", [product, g.const("axis_1", np.array([1], np.int64))], "u_dot_i", keepdims=1)
    x_row = g.op("Concat", [ie, product, dot, item_fe], "x_row", axis=1)
    t_row = g.op("Mul", [h["h1_row"], h["v_row"]], "t_row")
    cross_row = g.op("ReduceSum", [g.op("Mul", [t_row, x_row], "t_x_row"), "axis_1"], "cross_row", keepdims=1)
    t_user = g.op("Mul", [h["h1_user"], h["v_user"]], "t_user")
    x_user_t = g.op("Transpose", [x_user], "x_user_t", perm=[1, 0])
    cross_user = g.op("MatMul", [t_user, x_user_t], "cross_user")
    deep = g.op("MatMul", [g.op("Relu", [h["deep"]], "deep_1"), g.const("d2t", ranker.d2t)], "deep_2")
    deep = g.op("Relu", [g.op("Add", [deep, g.const("c2", ranker.c2)], "deep_2b")], "deep_2r")
    deep_logit = g.op("MatMul", [deep, g.const("h_d", ranker.h_d.reshape(-1, 1))], "deep_logit")
    logit = g.op("Add", [g.op("Add", [cross_user, cross_row], "cross"), h["hb2"]], "cross_b2")
    logit = g.op("Add", [logit, deep_logit], "logit_1")
    logit = g.op("Add", [logit, g.const("head_bias", np.array([ranker.head_bias], np.float32))], "logit")
    g.op("Sigmoid", [logit], schema.RANKER_OUTPUT.name)
    dim, n_uf, n_if, n_cf = b.dim, len(ranker.user_tables), len(ranker.item_tables), len(ranker.context_tables)
    inputs = [
        helper.make_tensor_value_info(ue, TensorProto.FLOAT, [1, dim]),
        helper.make_tensor_value_info(ie, TensorProto.FLOAT, ["n", dim]),
        helper.make_tensor_value_info(uf, TensorProto.INT64, [1, n_uf]),
        helper.make_tensor_value_info(itf, TensorProto.INT64, ["n", n_if]),
        helper.make_tensor_value_info(cf, TensorProto.INT64, [1, n_cf]),
    ]
    output = helper.make_tensor_value_info(schema.RANKER_OUTPUT.name, TensorProto.FLOAT, ["n", 1])
    graph = helper.make_graph(g.nodes, "ranker_factored", inputs, [output], g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def write_factored_model(model_onnx: Path, dest: Path) -> None:
    """``factored_graph`` of the ranker in ``model_onnx`` into ``dest``. Raises FactoredParityError when the file
    is not of the architecture ``FactoredRanker`` assumes (the Triton model then serves model.onnx alone)."""
    import onnx

    context = np.zeros(len(schema.CONTEXT_FEATURES), dtype=np.int64)
    try:
        ranker = FactoredRanker.from_onnx(model_onnx, context)
    except KeyError as exc:
        raise FactoredParityError(float("inf"), 0.0) from exc
    model = factored_graph(ranker)
    onnx.checker.check_model(model, full_check=True)  # shapes inferred too: a bad graph fails here, not in Triton
    tmp = dest.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dest)
