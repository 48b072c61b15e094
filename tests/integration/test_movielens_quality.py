"""Model quality on the real MovieLens 100K (read from RECSERVE_MOVIELENS_DIR, never shipped)."""

import pytest

from tests.conftest import Exported

pytestmark = [pytest.mark.integration, pytest.mark.movielens]


def test_retrieval_plus_ranking_beats_popularity_on_ndcg10(movielens_exported: Exported) -> None:
    metrics = movielens_exported.bundle.manifest["metrics"]
    assert metrics["_meta"]["users_evaluated"] == 943
    ranked, popular = metrics["retrieval+ranking"]["ndcg@10"], metrics["popularity"]["ndcg@10"]
    assert ranked > popular, f"NDCG@10: retrieval+ranking {ranked:.4f} vs popularity {popular:.4f}"


def test_movielens_ids_are_strings_from_the_files(movielens_exported: Exported) -> None:
    bundle = movielens_exported.bundle
    assert len(bundle.user_ids) == 943 and len(bundle.item_ids) == 1682
    assert bundle.user_ids[:3] == ["1", "2", "3"]
    assert all(isinstance(i, str) for i in bundle.user_history["1"])
