"""The temporal evaluation end to end, on the real MovieLens 100K and on an own log through the command:
split by time, train (as little as possible: this checks the plumbing, docs/EVALUATION.md has the
measured numbers), evaluate every model."""

import json
import math

import pytest

from export.__main__ import main
from export.data import load_movielens, movielens_dir
from export.temporal_eval import DEFAULT_ALPHAS, STAGES, run, session_row
from export.train import TrainConfig

pytestmark = pytest.mark.integration

TINY = TrainConfig(
    embedding_dim=16,
    retrieval_epochs=1,
    ranker_epochs=1,
    retrieval_batch_size=2048,
    ranker_batch_size=4096,
    negatives_per_positive=1,
)


@pytest.mark.movielens
def test_temporal_evaluation_on_movielens_100k() -> None:
    folder = movielens_dir()
    if not (folder / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {folder} (set RECSERVE_MOVIELENS_DIR)")
    report = run(load_movielens(folder), "global", TINY)
    meta = report["_meta"]
    # A global cutoff at the 80th percentile of time keeps the users with history on both sides of it.
    assert meta["users_evaluated"] == meta["users_eligible"] == 109
    assert meta["cutoff"] == "1998-03-07T02:21:09+00:00"
    for name in ("popularity", "two-tower", "two-tower+ranker"):
        assert 0.0 <= report[name]["ndcg@10"] <= 1.0 and 0.0 <= report[name]["recall@50"] <= 1.0
    for spec in ("serving", "last-k"):
        for alpha in DEFAULT_ALPHAS:
            for stage in STAGES:
                row = report[session_row(spec, alpha, stage)]
                assert not math.isnan(row["ndcg@10_delta"]) and 0.0 <= row["session_share"] <= 1.0
    # The control has a session for everyone: the latest training items are always there.
    assert report[session_row("last-k", 0.5, "served")]["session_share"] == 1.0


def test_an_own_log_with_event_types_goes_through_the_command(tmp_path, capsys) -> None:
    # Two kinds of item; every user clicks a few "a" items, then (later) two "b" items and comes back
    # for another "b" one: the session-aware model has something to find, and the purchase weighs nothing.
    rows = ["user_id,item_id,timestamp,event_type"]
    for u in range(12):
        t = 1_700_000_000 + u * 100_000
        for k in range(4):
            rows.append(f"cust-{u:03d},sku-a{(u + k) % 6},{t + 60 * k},view")
        rows.append(f"cust-{u:03d},sku-b{u % 6},{t + 600},click")
        rows.append(f"cust-{u:03d},sku-b{(u + 1) % 6},{t + 660},purchase")
        rows.append(f"cust-{u:03d},sku-b{(u + 2) % 6},{t + 720},click")
    log = tmp_path / "log.csv"
    log.write_text("\n".join(rows) + "\n")
    code = main(
        [
            "evaluate-temporal", "--interactions", str(log), "--name", "shop", "--split", "per-user",
            "--build-dir", str(tmp_path), "--dim", "8", "--retrieval-epochs", "1", "--ranker-epochs", "1",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "eval" / "temporal-shop-per-user.json").read_text())
    assert report["_meta"]["dataset"] == "shop" and report["_meta"]["default_event_kind"] is None
    assert report["_meta"]["users_evaluated"] == 12
    assert report[session_row("serving", 0.5, "served")]["session_share"] == 1.0
    assert "shop, split per-user" in capsys.readouterr().out
