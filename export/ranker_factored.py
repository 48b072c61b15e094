"""The shipped ranker's arithmetic regrouped for one user's candidates: the same scores with a third of the work.

Both the cpu profile's Triton model (a request is one user's candidates) and pre-compute (``n_candidates``
items for each user) score many items against one user, so every user's row of the ranker input repeats.
The DCN ranker (``export.models.Ranker``) spends nearly all of its time in three matrix products of its input
``x0 = [u, i, u*i, u.i, user features, item features, context]`` (449 wide at dim 128): ``W1 x0`` (cross 1),
``W2 x1`` (cross 2) and ``D1 x0`` (deep 1), about 1.07 MFLOP per (user, item) row. Two identities make most of
it per-user work:

- ``x0 W^T`` is a sum over x0's column blocks: the user and context blocks are one product per user, and
  for a fixed user the ``i``, ``u*i`` and ``u.i`` blocks are all linear in ``i``:
  ``i W_i + (u*i) W_p + (u.i) w = i (W_i + diag(u) (W_p + w))``, one matrix per user.
- Cross 2 enters the score only through the head: ``h . x2 = (h * x0) . (W2 x1 + b2) + h . x1``, and
  ``(h * x0) . (W2 x1) = x1 . (x0 A)`` with ``A = diag(h) W2``: a product of x0 again, which splits the same
  way, instead of a full 449 x 449 product of x1.

Per row that leaves the row ``[i, item features]`` times the user's matrices (all of x0 @ [W1, A, D1] and the
head's ``h * b2`` term) and the 256 -> 64 deep layer: about 0.38 MFLOP. ``factored_graph`` writes this as an
ONNX graph of one user's candidates; ``write_factored_model`` puts it beside ``model.onnx`` for Triton, and
``FactoredScorer`` runs it for pre-compute. The weights are read from the exported ONNX file that serving uses;
Triton's model checks the graph against ``model.onnx`` when it loads, pre-compute with ``check_parity`` on the
job's own rows before anything is written. Floating-point sums run in another order, so scores differ in the
last bits (measured max |diff| ~1e-7): lists are equal up to the order of items whose scores tie within that.
"""

from __future__ import annotations

from collections.abc import Callable
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
        return np.r_[_range(self.u), _range(self.uf), _range(self.ctx)]


def _range(block: slice) -> np.ndarray:
    return np.arange(block.start, block.stop)


class FactoredRanker:
    """The exported ranker's weights, regrouped for ``factored_graph`` (module docstring)."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
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

    def column_groups(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """x0 @ wcat's columns in the groups the score reads them in, each as (weights [width, cols], bias):
        h1's and v's columns of the row's blocks (i, u*i, u.i, item features), h1's and v's columns of the
        user's blocks (u, user features, context), deep layer 1, and the head's h_x * b2 term."""
        b, width, wcat, bias = self.blocks, self.width, self.wcat, self.bias
        user_columns = b.user_columns
        row_columns = np.r_[_range(b.i), _range(b.p), [b.dot], _range(b.itf)]
        deep_columns = np.arange(2 * width, wcat.shape[1])
        return {
            "h1_row": (wcat[:, row_columns], bias[row_columns]),
            "h1_user": (wcat[:, user_columns], bias[user_columns]),
            "v_row": (wcat[:, width + row_columns], bias[width + row_columns]),
            "v_user": (wcat[:, width + user_columns], bias[width + user_columns]),
            "deep": (wcat[:, deep_columns], bias[deep_columns]),
            "hb2": (self.hb2[:, None], np.zeros(1, np.float32)),
        }

    def split_rows(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A [width, cols] weight of x0 split for one user's candidates: ``(fixed, scaled, user)`` such that
        ``x0 @ w = x @ (fixed + diag([u, 0]) scaled) + x_user @ user``, with ``x = [i, item features]`` the
        candidate's row and ``x_user = [u, user features, context]`` the user's (the module docstring's
        i W_i + (u*i) W_p + (u.i) w = i (W_i + diag(u)(W_p + w)))."""
        b = self.blocks
        n_item_fe = b.itf.stop - b.itf.start
        fixed = np.concatenate([w[b.i], w[b.itf]], axis=0)
        scaled = np.concatenate([w[b.p] + w[b.dot][None, :], np.zeros((n_item_fe, w.shape[1]), np.float32)], axis=0)
        return fixed, scaled, np.ascontiguousarray(w[b.user_columns])

    @classmethod
    def from_onnx(cls, path: Path) -> FactoredRanker:
        """The weights of an ONNX export of ``export.models.Ranker`` (its parameter names)."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        return cls({t.name: numpy_helper.to_array(t) for t in model.graph.initializer})


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

    b = ranker.blocks
    g = _GraphBuilder()
    ue, ie, uf, itf, cf = "user_embedding", "item_embedding", "user_features", "item_features", "context_features"
    user_fe = g.embed("uf", uf, ranker.user_tables)
    item_fe = g.embed("if", itf, ranker.item_tables)
    context_fe = g.embed("cf", cf, ranker.context_tables)
    groups = ranker.column_groups()
    x_user = g.op("Concat", [ue, user_fe, context_fe], "x_user", axis=1)
    x = g.op("Concat", [ie, item_fe], "x", axis=1)
    # i W_i + (u * i) W_p + (u . i) w = i (W_i + diag(u) (W_p + w)): the user's matrix, made once per request,
    # with the item-feature rows (W_itf) below it; u is padded with zeros so one Mul scales only the i rows.
    n_item_fe = b.itf.stop - b.itf.start
    padding = g.const("item_fe_zeros", np.zeros((1, n_item_fe), np.float32))
    u_padded = g.op("Transpose", [g.op("Concat", [ue, padding], "u_padded_row", axis=1)], "u_padded", perm=[1, 0])
    h = {}
    for name, (w, group_bias) in groups.items():
        fixed, scaled, w_user = ranker.split_rows(w)
        m_user = g.op("Mul", [g.const(f"scaled_{name}", scaled), u_padded], f"scaled_u_{name}")
        m_user = g.op("Add", [g.const(f"fixed_{name}", fixed), m_user], f"m_user_{name}")
        user_part = g.op("MatMul", [x_user, g.const(f"w_user_{name}", w_user)], f"u0_{name}")
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


class FactoredScorer:
    """``factored_graph`` in ONNX Runtime, one call per user's candidates, in a fixed context: pre-compute's
    ranker (export/precompute.py)."""

    def __init__(self, ranker: FactoredRanker, context: np.ndarray, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        graph = factored_graph(ranker).SerializeToString()
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.context = np.asarray(context, dtype=np.int64).reshape(1, -1)

    def score(
        self,
        user_embeddings: np.ndarray,
        user_features: np.ndarray,
        item_embeddings: np.ndarray,
        item_features: np.ndarray,
        candidates: np.ndarray,
    ) -> np.ndarray:
        """float32 [n_users, n] scores of each user's ``candidates`` [n_users, n] (rows of the item tables:
        float32 embeddings, int64 features); a slot of -1 gets a meaningless score, for the caller to mask."""
        user_embeddings = np.asarray(user_embeddings, dtype=np.float32)
        user_features = np.asarray(user_features, dtype=np.int64)
        out = np.empty(candidates.shape, dtype=np.float32)
        for k, items in enumerate(np.maximum(candidates, 0)):  # -1: any item, its score is masked
            tensors = {
                "user_embedding": user_embeddings[k : k + 1],
                "item_embedding": item_embeddings[items],
                "user_features": user_features[k : k + 1],
                "item_features": item_features[items],
                "context_features": self.context,
            }
            out[k] = self.session.run(None, tensors)[0].reshape(-1)
        return out


def max_score_diff(score: Callable[..., np.ndarray], reference: np.ndarray, rows: dict[str, np.ndarray]) -> float:
    """Max |score diff| of a scorer's ``score`` (``FactoredScorer.score``'s arguments) against ``reference`` (the
    exported model's scores of the same rows) on rows given as the ranker's named tensors, one user per row."""
    ours = score(
        rows["user_embedding"],
        rows["user_features"],
        rows["item_embedding"],
        rows["item_features"],
        np.arange(len(rows["item_embedding"])).reshape(-1, 1),
    ).reshape(-1)
    return float(np.abs(ours - np.asarray(reference, dtype=np.float32).reshape(-1)).max(initial=0.0))


def check_parity(
    scorer: FactoredScorer, reference: np.ndarray, rows: dict[str, np.ndarray], tolerance: float = 1e-5
) -> float:
    """``max_score_diff`` against ``reference`` (ONNX Runtime on the exported model); raises
    ``FactoredParityError`` past ``tolerance``."""
    diff = max_score_diff(scorer.score, reference, rows)
    if not diff <= tolerance:
        raise FactoredParityError(diff, tolerance)
    return diff


def write_factored_model(model_onnx: Path, dest: Path) -> None:
    """``factored_graph`` of the ranker in ``model_onnx`` into ``dest``. Raises FactoredParityError when the file
    is not of the architecture ``FactoredRanker`` assumes (the Triton model then serves model.onnx alone)."""
    import onnx

    try:
        ranker = FactoredRanker.from_onnx(model_onnx)
    except KeyError as exc:
        raise FactoredParityError(float("inf"), 0.0) from exc
    model = factored_graph(ranker)
    onnx.checker.check_model(model, full_check=True)  # shapes inferred too: a bad graph fails here, not in Triton
    tmp = dest.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dest)
