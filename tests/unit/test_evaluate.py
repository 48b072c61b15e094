import math

import numpy as np
import pytest

from export.evaluate import recall_ndcg


def test_recall_and_ndcg_by_hand() -> None:
    recommended = [np.array([5, 1, 7]), np.array([2, 3, 4])]
    relevant = [{1, 9}, {4}]
    recall, ndcg = recall_ndcg(recommended, relevant, k=3)
    # user 0: one of two relevant found at rank 2; user 1: the one relevant at rank 3
    assert recall == pytest.approx((0.5 + 1.0) / 2)
    dcg0 = 1 / math.log2(3)
    idcg0 = 1 / math.log2(2) + 1 / math.log2(3)
    dcg1 = 1 / math.log2(4)
    assert ndcg == pytest.approx((dcg0 / idcg0 + dcg1 / 1.0) / 2)


def test_perfect_and_empty_lists() -> None:
    assert recall_ndcg([np.array([1, 2])], [{1, 2}], k=2) == (1.0, 1.0)
    assert recall_ndcg([np.array([3, 4])], [{1, 2}], k=2) == (0.0, 0.0)


def test_users_without_truth_are_skipped() -> None:
    recall, _ = recall_ndcg([np.array([1]), np.array([1])], [set(), {1}], k=1)
    assert recall == 1.0
