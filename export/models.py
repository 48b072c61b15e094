"""The two models: a two-tower retriever and a DCN-style ranker. Pure torch modules, no training.

The ranker's ``forward`` takes exactly the tensors named in ``orchestrator.schema.ranker_inputs`` in that
order, so the same signature feeds ``torch.onnx.export``, TorchScript and the Triton configs.
"""

from __future__ import annotations

import torch
from torch import nn

from orchestrator import schema


def _feature_embeddings(features: tuple[tuple[str, int], ...], dim: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Embedding(size, dim) for _, size in features)


def _embed_columns(tables: nn.ModuleList, columns: torch.Tensor) -> torch.Tensor:
    parts = []
    for k, table in enumerate(tables):
        assert isinstance(table, nn.Embedding)
        # Clamp, so an out-of-vocabulary index from a newer feature pipeline cannot crash serving.
        parts.append(table(columns[:, k].clamp(0, table.num_embeddings - 1)))
    return torch.cat(parts, dim=1)


class Tower(nn.Module):
    """id embedding + categorical feature embeddings -> MLP -> L2-normalised vector."""

    def __init__(self, n_ids: int, features: tuple[tuple[str, int], ...], out_dim: int) -> None:
        super().__init__()
        # Sparse gradients: a step touches (and its optimiser updates) only the rows of its batch, so
        # its cost does not grow with the number of users or items (export.train pairs it with SparseAdam).
        self.id_embedding = nn.Embedding(n_ids, 64, sparse=True)
        self.feature_embeddings = _feature_embeddings(features, 16)
        self.mlp = nn.Sequential(nn.Linear(64 + 16 * len(features), 256), nn.ReLU(), nn.Linear(256, out_dim))

    def forward(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.id_embedding(ids), _embed_columns(self.feature_embeddings, features)], dim=1)
        return nn.functional.normalize(self.mlp(x), dim=1)


# (name, vocabulary size) per feature column: orchestrator.schema's by default (MovieLens, synthetic); an own
# data set's from its files (``export.data.Dataset.user_feature_spec``, recorded in the bundle's manifest).
FeatureSpec = tuple[tuple[str, int], ...]


class TwoTower(nn.Module):
    """Dot-product retrieval: user and item towers into one ``dim``-wide space (inner product = cosine)."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int = 128,
        user_features: FeatureSpec = schema.USER_FEATURES,
        item_features: FeatureSpec = schema.ITEM_FEATURES,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.user_tower = Tower(n_users, user_features, dim)
        self.item_tower = Tower(n_items, item_features, dim)


class CrossLayer(nn.Module):
    """DCN-v2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class Ranker(nn.Module):
    """DCN-v2 style ranker over (user, item, context); returns P(interaction) as a [batch, 1] tensor."""

    def __init__(
        self,
        embedding_dim: int = 128,
        n_cross: int = 2,
        user_features: FeatureSpec = schema.USER_FEATURES,
        item_features: FeatureSpec = schema.ITEM_FEATURES,
    ) -> None:
        super().__init__()
        # The tensor widths are the contract's; only the vocabulary sizes may differ.
        for name, spec, contract in (
            ("user_features", user_features, schema.USER_FEATURES),
            ("item_features", item_features, schema.ITEM_FEATURES),
        ):
            if len(spec) != len(contract):
                raise ValueError(f"{name} must have {len(contract)} columns (orchestrator.schema), got {len(spec)}")
        self.embedding_dim = embedding_dim
        self.user_feature_embeddings = _feature_embeddings(user_features, 8)
        self.item_feature_embeddings = _feature_embeddings(item_features, 8)
        self.context_embeddings = _feature_embeddings(schema.CONTEXT_FEATURES, 8)
        n_categorical = len(schema.USER_FEATURES) + len(schema.ITEM_FEATURES) + len(schema.CONTEXT_FEATURES)
        # user, item, their elementwise product, their dot product, categorical embeddings
        width = 3 * embedding_dim + 1 + 8 * n_categorical
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(n_cross))
        self.deep = nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(width + 64, 1)

    def forward(
        self,
        user_embedding: torch.Tensor,
        item_embedding: torch.Tensor,
        user_features: torch.Tensor,
        item_features: torch.Tensor,
        context_features: torch.Tensor,
    ) -> torch.Tensor:
        product = user_embedding * item_embedding
        x0 = torch.cat(
            [
                user_embedding,
                item_embedding,
                product,
                product.sum(dim=1, keepdim=True),
                _embed_columns(self.user_feature_embeddings, user_features),
                _embed_columns(self.item_feature_embeddings, item_features),
                _embed_columns(self.context_embeddings, context_features),
            ],
            dim=1,
        )
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return torch.sigmoid(self.head(torch.cat([x, self.deep(x0)], dim=1)))
