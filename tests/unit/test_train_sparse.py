"""Two-tower training updates the id embedding tables sparsely: a step's cost and effect stay with its
batch's rows, however many users and items the tables hold."""

import numpy as np
import torch

from export.models import TwoTower
from export.topk import top_k
from export.train import (
    TrainConfig,
    approximate_top,
    epoch_order,
    hard_negatives,
    interacted,
    tower_table,
    two_tower_optimisers,
    two_tower_step,
)
from orchestrator import schema


def _features(n: int, spec: tuple[tuple[str, int], ...]) -> torch.Tensor:
    rng = np.random.default_rng(n)
    return torch.from_numpy(np.stack([rng.integers(0, size, n) for _, size in spec], axis=1))


def test_a_step_moves_only_the_rows_of_its_batch() -> None:
    torch.manual_seed(0)
    model = TwoTower(1000, 500, 16)
    optimisers = two_tower_optimisers(model, 1e-2)
    kinds = {type(o).__name__ for o in optimisers}
    assert kinds == {"Adam", "SparseAdam"}
    sparse = next(o for o in optimisers if isinstance(o, torch.optim.SparseAdam))
    assert {id(p) for group in sparse.param_groups for p in group["params"]} == {
        id(model.user_tower.id_embedding.weight),
        id(model.item_tower.id_embedding.weight),
    }
    users_f, items_f = _features(1000, schema.USER_FEATURES), _features(500, schema.ITEM_FEATURES)
    table = model.user_tower.id_embedding.weight
    first = torch.tensor([1, 5, 7, 9])
    two_tower_step(model, optimisers, first, torch.tensor([2, 3, 4, 6]), users_f, items_f, 0.1)
    after_first = table.detach().clone()
    second = torch.tensor([11, 12, 13, 14])
    two_tower_step(model, optimisers, second, torch.tensor([20, 21, 22, 23]), users_f, items_f, 0.1)
    moved = (table.detach() != after_first).any(dim=1).nonzero().flatten().tolist()
    # Dense Adam would keep moving rows 1, 5, 7, 9 on their momentum (and every row's moments in memory).
    assert moved == second.tolist()


def test_tower_tables_are_embedded_in_batches() -> None:
    torch.manual_seed(0)
    model = TwoTower(300, 50, TrainConfig(embedding_dim=8).embedding_dim)
    model.eval()
    feats = _features(300, schema.USER_FEATURES)
    whole = tower_table(model.user_tower, feats, batch=1000)
    batched = tower_table(model.user_tower, feats, batch=7)
    assert whole.shape == (300, 8) and whole.dtype == np.float32
    np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-6)


def test_an_epoch_covers_every_pair_up_to_the_cap_and_draws_that_many_past_it() -> None:
    rng = np.random.default_rng(0)
    assert sorted(epoch_order(rng, 50, 50).tolist()) == list(range(50))
    drawn = epoch_order(rng, 1_000_000, 1000)
    assert len(drawn) == 1000 and drawn.min() >= 0 and drawn.max() < 1_000_000


def test_interacted_finds_training_pairs_across_chunks() -> None:
    class Log:
        n_items = 10
        user_idx = np.array([0, 0, 1, 2, 2, 3])
        item_idx = np.array([1, 4, 4, 0, 9, 5])

    class Split:
        train = np.array([True, True, True, True, True, False])  # (3, 5) is a test interaction

    users, items = np.array([0, 0, 1, 2, 3, 2]), np.array([4, 5, 4, 9, 5, 1])
    for chunk in (1, 2, 100):
        assert interacted(Log, Split, users, items, chunk).tolist() == [True, False, True, True, False, False]  # type: ignore[arg-type]


def test_hard_negatives_of_a_large_catalog_come_from_the_inverted_file_near_the_exact_ones() -> None:
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((64, 16)).astype(np.float32)
    items = centers[rng.integers(0, 64, 30_000)] + 0.3 * rng.standard_normal((30_000, 16)).astype(np.float32)
    users = centers[rng.integers(0, 64, 300)] + 0.3 * rng.standard_normal((300, 16)).astype(np.float32)
    rows = np.arange(300)
    exact = {int(r): set(t.tolist()) for rs, ts in top_k(users, items, 200, rows) for r, t in zip(rs, ts, strict=True)}
    found = [(int(r), t) for rs, top in approximate_top(users, items, 200, rows) for r, t in zip(rs, top, strict=True)]
    assert [r for r, _ in found] == rows.tolist()
    recall = np.mean([len(exact[r] & set(t.tolist())) / 200 for r, t in found])
    assert recall > 0.8, recall
    assert min(int(t.min()) for _, t in found) >= 0  # every slot an item
    # hard_negatives takes that path past EXACT_HARD_NEGATIVE_ITEMS: a user's nearest items are among the exact ones.
    picked = hard_negatives(users, items, np.array([3, 7, 9]), np.array([0, 1, 5]), depth=200)
    assert all(int(item) in exact[user] for user, item in zip((3, 7, 9), picked, strict=True))
