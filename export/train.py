"""Training loops for the two-tower retriever and the ranker (CPU is fine at MovieLens scale).

Nothing here grows with users x items: the id embedding tables take sparse updates (SparseAdam, only
the rows of a batch), the towers embed every id a batch at a time, and hard negatives are mined a
chunk of users at a time (``export.topk``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from export.data import Dataset, Split, popularity_buckets
from export.models import Ranker, TwoTower
from export.topk import top_k
from orchestrator import schema

log = logging.getLogger(__name__)

HARD_NEGATIVE_DEPTH = 200  # a hard negative is one of the user's nearest this many items
EXACT_HARD_NEGATIVE_ITEMS = 20_000  # larger catalogs (samples): hard negatives from an IVF index
INFERENCE_BATCH = 65_536  # ids per forward pass when the trained towers embed every user and item


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. ``embedding_dim`` is the width of every stored embedding."""

    embedding_dim: int = 128
    retrieval_epochs: int = 20
    retrieval_batch_size: int = 512
    retrieval_lr: float = 3e-3
    temperature: float = 0.1
    ranker_epochs: int = 4
    ranker_batch_size: int = 1024
    ranker_lr: float = 1e-3
    negatives_per_positive: int = 4
    hard_negative_items: int = 50_000  # larger catalogs: hard negatives among a seeded sample this big
    max_pairs_per_epoch: int = 1_000_000
    """Rows one epoch of either model trains on, at most: a two-tower epoch on a seeded draw of this many
    training interactions when there are more (all of them, shuffled, otherwise); the ranker on one draw of
    positives with their sampled negatives, this many rows in all. Training time and memory then follow
    this, not the size of the log: at 1M users x 119M interactions, 20 two-tower epochs see 20M pairs
    (some 20 updates of each user's embedding), 4 ranker epochs 4M rows."""
    seed: int = 13

    def validate(self) -> None:
        if self.embedding_dim < 8:
            raise ValueError(f"embedding_dim must be an integer >= 8, got {self.embedding_dim}")
        for name in (
            "retrieval_epochs",
            "ranker_epochs",
            "retrieval_batch_size",
            "ranker_batch_size",
            "max_pairs_per_epoch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)}")


@dataclass
class TrainedModels:
    """Everything serving needs from training: both towers' outputs, features, and the ranker."""

    two_tower: TwoTower
    ranker: Ranker
    user_embeddings: np.ndarray  # float32 [n_users, dim], L2-normalised
    item_embeddings: np.ndarray  # float32 [n_items, dim], L2-normalised
    user_features: np.ndarray  # int64 [n_users, len(USER_FEATURES)]
    item_features: np.ndarray  # int64 [n_items, len(ITEM_FEATURES)]
    item_train_counts: np.ndarray  # int64 [n_items]


def item_features(data: Dataset, train_counts: np.ndarray) -> np.ndarray:
    """genre, year bucket and popularity decile (from training counts only: no test leakage)."""
    return np.concatenate([data.item_genre_year, popularity_buckets(train_counts)[:, None]], axis=1)


def random_context(rng: np.random.Generator, n: int) -> np.ndarray:
    """MovieLens has no page type or device: training draws them at random (the ranker learns they are
    uninformative here; real logs carry them)."""
    return np.stack(
        [rng.integers(1, len(schema.PAGE_TYPES), n), rng.integers(1, len(schema.DEVICES), n)], axis=1
    ).astype(np.int64)


def two_tower_optimisers(model: nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    """Adam for the dense parameters (feature embeddings, MLPs), SparseAdam for the sparse id embedding
    tables: a step updates only the rows its batch touched, so its cost does not grow with the tables."""
    sparse = [
        p
        for module in model.modules()
        if isinstance(module, nn.Embedding) and module.sparse
        for p in module.parameters()
    ]
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    optimisers: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=lr)]
    if sparse:
        optimisers.append(torch.optim.SparseAdam(sparse, lr=lr))
    return optimisers


def two_tower_step(
    model: TwoTower,
    optimisers: list[torch.optim.Optimizer],
    users: torch.Tensor,
    items: torch.Tensor,
    user_feats: torch.Tensor,
    item_feats: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """One step of in-batch sampled softmax on (user, item) pairs; returns the loss."""
    user_vec = model.user_tower(users, user_feats[users])
    item_vec = model.item_tower(items, item_feats[items])
    logits = user_vec @ item_vec.T / temperature
    # The same item twice in a batch is not a negative for itself.
    same_item = (items[:, None] == items[None, :]) & ~torch.eye(len(items), dtype=torch.bool)
    logits = logits.masked_fill(same_item, -1e9)
    loss = nn.functional.cross_entropy(logits, torch.arange(len(users)))
    for optimiser in optimisers:
        optimiser.zero_grad(set_to_none=True)
    loss.backward()
    for optimiser in optimisers:
        optimiser.step()
    return loss


def tower_table(tower: nn.Module, features: torch.Tensor, batch: int = INFERENCE_BATCH) -> np.ndarray:
    """Every id's vector from a trained tower, a batch of ids at a time."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(features), batch):
            ids = torch.arange(start, min(start + batch, len(features)))
            parts.append(tower(ids, features[ids]).numpy().astype(np.float32))
    return np.concatenate(parts)


def epoch_order(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """The rows one epoch visits: all ``n`` shuffled when ``size`` covers them, else ``size`` drawn at random
    (with replacement: O(size), where a draw without replacement would shuffle all ``n``)."""
    return rng.permutation(n) if size >= n else rng.integers(0, n, size)


def train_two_tower(
    data: Dataset, split: Split, cfg: TrainConfig, item_feats: np.ndarray
) -> tuple[TwoTower, np.ndarray, np.ndarray]:
    """In-batch sampled softmax over training interactions; returns the model and both vector tables."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = TwoTower(data.n_users, data.n_items, cfg.embedding_dim, data.user_feature_spec, data.item_model_features)
    optimisers = two_tower_optimisers(model, cfg.retrieval_lr)
    users = torch.from_numpy(data.user_idx[split.train])
    items = torch.from_numpy(data.item_idx[split.train])
    user_feats = torch.from_numpy(data.user_features)
    item_feats_t = torch.from_numpy(item_feats)
    n = min(len(users), cfg.max_pairs_per_epoch)
    steps = cfg.retrieval_epochs * ((n + cfg.retrieval_batch_size - 1) // cfg.retrieval_batch_size)
    progress = tqdm(total=steps, desc="two-tower", unit="step", mininterval=2.0)
    model.train()
    for _ in range(cfg.retrieval_epochs):
        order = torch.from_numpy(epoch_order(rng, len(users), n))
        for start in range(0, n, cfg.retrieval_batch_size):
            batch = order[start : start + cfg.retrieval_batch_size]
            loss = two_tower_step(
                model, optimisers, users[batch], items[batch], user_feats, item_feats_t, cfg.temperature
            )
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    progress.close()
    model.eval()
    return model, tower_table(model.user_tower, user_feats), tower_table(model.item_tower, item_feats_t)


def hard_negatives(
    user_table: np.ndarray,
    item_table: np.ndarray,
    users: np.ndarray,
    columns: np.ndarray,
    depth: int = HARD_NEGATIVE_DEPTH,
    catalog: np.ndarray | None = None,
) -> np.ndarray:
    """For each ``users[j]``, the item at rank ``columns[j]`` (0-based, below ``depth``) of that user's
    nearest items by the retriever, found a chunk of users at a time, never as a users x items matrix.
    ``catalog`` (item rows) restricts the search to those items. Past ``EXACT_HARD_NEGATIVE_ITEMS`` items
    the neighbours come from an inverted-file index, as serving's retriever finds them (``approximate_top``)."""
    items = item_table if catalog is None else item_table[catalog]
    out = np.empty(len(users), dtype=np.int64)
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    if len(items) > EXACT_HARD_NEGATIVE_ITEMS:
        chunks = approximate_top(user_table, items, depth, np.unique(sorted_users))
    else:
        chunks = top_k(user_table, items, depth, np.unique(sorted_users), progress="hard negatives")
    for rows, top in chunks:
        lo, hi = np.searchsorted(sorted_users, rows[0], "left"), np.searchsorted(sorted_users, rows[-1], "right")
        picks = order[lo:hi]
        out[picks] = top[np.searchsorted(rows, users[picks]), columns[picks]]
    return out if catalog is None else catalog[out]


def approximate_top(
    user_table: np.ndarray, items: np.ndarray, k: int, users: np.ndarray, chunk: int = 65_536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Like ``top_k`` (``(user rows, top)`` per chunk, best first), from a FAISS IVF-Flat index over
    ``items`` probing about 2% of it: some 50x less work than scoring every item, which at 1M users
    and a 50K-item sample is most of the ranker's training time. A slot the probed lists leave empty
    takes the user's nearest item."""
    import faiss

    items = np.ascontiguousarray(items, dtype=np.float32)
    n_lists = max(1, int(4 * np.sqrt(len(items))))
    quantizer = faiss.IndexFlatIP(items.shape[1])
    index = faiss.IndexIVFFlat(quantizer, items.shape[1], n_lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 13
    index.train(items)
    index.add(items)
    index.nprobe = max(1, n_lists // 50)
    with tqdm(total=len(users), desc="hard negatives", unit="user", mininterval=2.0) as bar:
        for start in range(0, len(users), chunk):
            rows = users[start : start + chunk]
            _, top = index.search(np.ascontiguousarray(user_table[rows], dtype=np.float32), k)
            top = np.where(top < 0, top[:, :1], top)
            bar.update(len(rows))
            yield rows, top


def interacted(
    data: Dataset, split: Split, users: np.ndarray, items: np.ndarray, chunk: int = 10_000_000
) -> np.ndarray:
    """Whether each (user, item) pair is a training interaction: sorted searches against the training
    pairs a chunk at a time, so memory follows the chunk, not the log."""
    keys = users.astype(np.int64) * data.n_items + items
    found = np.zeros(len(keys), dtype=bool)
    train_rows = np.flatnonzero(split.train)
    for lo in range(0, len(train_rows), chunk):
        rows = train_rows[lo : lo + chunk]
        found |= np.isin(keys, data.user_idx[rows].astype(np.int64) * data.n_items + data.item_idx[rows])
    return found


def train_ranker(
    data: Dataset,
    split: Split,
    cfg: TrainConfig,
    user_table: np.ndarray,
    item_table: np.ndarray,
    item_feats: np.ndarray,
) -> Ranker:
    """Binary cross-entropy: training interactions against sampled items the user did not touch.

    Half the negatives are uniform, half are the user's nearest items by the retriever (hard
    negatives), so the ranker learns to reorder the candidates retrieval actually hands it.
    """
    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    train_rows = np.flatnonzero(split.train)
    positives = cfg.max_pairs_per_epoch // (1 + cfg.negatives_per_positive)
    if len(train_rows) > positives:
        train_rows = train_rows[np.sort(rng.integers(0, len(train_rows), positives))]
    pos_users = data.user_idx[train_rows]
    pos_items = data.item_idx[train_rows]
    k = cfg.negatives_per_positive
    neg_users = np.repeat(pos_users, k)
    neg_items = rng.integers(0, data.n_items, size=len(neg_users))
    hard = rng.random(len(neg_users)) < 0.5
    catalog = None
    if data.n_items > cfg.hard_negative_items:  # mine among a seeded sample of a very large catalog
        catalog = np.sort(rng.choice(data.n_items, size=cfg.hard_negative_items, replace=False))
    depth = min(HARD_NEGATIVE_DEPTH, data.n_items if catalog is None else len(catalog))
    columns = rng.integers(0, depth, size=int(hard.sum()))
    neg_items[hard] = hard_negatives(user_table, item_table, neg_users[hard], columns, depth, catalog)
    keep = ~interacted(data, split, neg_users, neg_items)
    users = np.concatenate([pos_users, neg_users[keep]])
    items = np.concatenate([pos_items, neg_items[keep]])
    labels = np.concatenate([np.ones(len(pos_users)), np.zeros(int(keep.sum()))]).astype(np.float32)
    context = random_context(rng, len(users))

    model = Ranker(cfg.embedding_dim, user_features=data.user_feature_spec, item_features=data.item_model_features)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.ranker_lr)
    tensors = {
        "u_emb": torch.from_numpy(user_table),
        "i_emb": torch.from_numpy(item_table),
        "u_feat": torch.from_numpy(data.user_features),
        "i_feat": torch.from_numpy(item_feats),
    }
    users_t, items_t = torch.from_numpy(users), torch.from_numpy(items)
    labels_t, context_t = torch.from_numpy(labels), torch.from_numpy(context)
    n = len(users)
    steps = cfg.ranker_epochs * ((n + cfg.ranker_batch_size - 1) // cfg.ranker_batch_size)
    progress = tqdm(total=steps, desc="ranker", unit="step", mininterval=2.0)
    model.train()
    for _ in range(cfg.ranker_epochs):
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, cfg.ranker_batch_size):
            batch = order[start : start + cfg.ranker_batch_size]
            u, i = users_t[batch], items_t[batch]
            scores = model(
                tensors["u_emb"][u],
                tensors["i_emb"][i],
                tensors["u_feat"][u],
                tensors["i_feat"][i],
                context_t[batch],
            ).squeeze(1)
            loss = nn.functional.binary_cross_entropy(scores, labels_t[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    progress.close()
    model.eval()
    return model


def train(data: Dataset, split: Split, cfg: TrainConfig) -> TrainedModels:
    cfg.validate()
    counts = np.bincount(data.item_idx[split.train], minlength=data.n_items).astype(np.int64)
    item_feats = item_features(data, counts)
    log.info("training two-tower on %d interactions", int(split.train.sum()))
    two_tower, user_table, item_table = train_two_tower(data, split, cfg, item_feats)
    log.info("training ranker")
    ranker = train_ranker(data, split, cfg, user_table, item_table, item_feats)
    return TrainedModels(two_tower, ranker, user_table, item_table, data.user_features, item_feats, counts)
