"""The own-data contract (export/interactions.py): what a good file becomes, and each bad file's error."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from export.__main__ import main
from export.data import movielens_small_dir
from export.errors import DataFileError, DatasetSpecError, MissingDataError
from export.interactions import (
    MAX_ITEM_FEATURES,
    check_name,
    load_movielens_small,
    parse_timestamp,
    read_interactions,
)
from export.models import Ranker, TwoTower
from orchestrator import schema
from tests.own_data import write_shop

HEADER = "user_id,item_id,timestamp,weight,event_type\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_log_with_string_ids_both_timestamp_forms_and_features(tmp_path: Path) -> None:
    log = write(
        tmp_path / "log.csv",
        HEADER
        + "cust-00042,sku-ab12,1700000000,2.5,view\n"
        + "cust-00042,sku-cd34,2023-11-14T22:13:21Z,,click\n".replace(",,", ",1,")
        + "user@example.com,sku-ab12,2023-11-14 22:13:22+01:00,1,purchase\n",
    )
    users = write(tmp_path / "users.csv", "user_id,country,age\ncust-00042,DE,31\nnobody,FR,20\n")
    items = write(tmp_path / "items.csv", "item_id,category,price\nsku-ab12,shoes,10.5\nsku-cd34,books,3\n")
    own = read_interactions(log, "shop", users=users, items=items)
    data = own.dataset
    assert data.user_ids == ["cust-00042", "user@example.com"]
    assert data.item_ids == ["sku-ab12", "sku-cd34"]
    assert data.user_idx.tolist() == [0, 0, 1] and data.item_idx.tolist() == [0, 1, 0]
    # Epoch seconds as is; ISO 8601 with Z, with an offset.
    assert data.timestamp.tolist() == [1_700_000_000, 1_700_000_001, 1_700_000_002 - 3600]
    assert data.rating.tolist() == [2.5, 1.0, 1.0]
    assert data.event_types == ("", "view", "click", "purchase")
    assert data.event_type is not None and data.event_type.tolist() == [1, 2, 3]
    # country categorical (DE only: the log's users), age numeric; the 3rd user slot unused.
    assert [(c.name, c.kind) for c in own.user_features] == [("country", "categorical"), ("age", "numeric")]
    assert data.user_feature_spec == (("country", 2), ("age", own.user_features[1].size), ("unused2", 1))
    assert data.user_features[:, 0].tolist() == [1, 0]  # user@example.com is not in users.csv: unknown
    assert data.user_features[1].tolist() == [0, 0, 0]
    assert data.item_feature_spec[0] == ("category", 3)
    assert data.item_model_features[2] == schema.ITEM_FEATURES[2]  # the derived popularity bucket
    assert data.item_genre_year[:, 1].min() >= 1  # both prices present: a bucket each
    assert own.describe()["item"][1]["kind"] == "numeric"


def test_the_models_size_their_feature_tables_from_the_data_set(tmp_path: Path) -> None:
    interactions, users, items = write_shop(tmp_path, n_users=30, n_items=20, per_user=5)
    data = read_interactions(interactions, "shop", users=users, items=items).dataset
    ranker = Ranker(16, user_features=data.user_feature_spec, item_features=data.item_model_features)
    sizes = [table.num_embeddings for table in ranker.item_feature_embeddings]
    assert sizes == [size for _, size in data.item_model_features]
    tower = TwoTower(data.n_users, data.n_items, 16, data.user_feature_spec, data.item_model_features)
    assert tower.user_tower.id_embedding.num_embeddings == 30
    with pytest.raises(ValueError, match=r"item_features must have 3 columns \(orchestrator.schema\), got 2"):
        Ranker(16, item_features=data.item_feature_spec)


def test_a_parquet_log_reads_like_its_csv(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "user_id": ["cust-1", "cust-2"],
            "item_id": [12, 13],  # integer ids become the strings "12", "13"
            "timestamp": pa.array([datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2)], pa.timestamp("s")),
        }
    )
    pq.write_table(table, tmp_path / "log.parquet")
    data = read_interactions(tmp_path / "log.parquet", "shop").dataset
    assert data.item_ids == ["12", "13"]
    assert data.timestamp.tolist() == [1_704_067_200, 1_704_153_600]
    pq.write_table(table.set_column(2, "timestamp", pa.array(["soon", "later"])), tmp_path / "bad.parquet")
    with pytest.raises(
        DataFileError, match=r"bad.parquet, row 1, column 'timestamp': expected epoch seconds or an ISO"
    ):
        read_interactions(tmp_path / "bad.parquet", "shop")
    write(tmp_path / "fake.parquet", "user_id,item_id,timestamp\n")
    with pytest.raises(DataFileError, match=r"fake.parquet: expected a Parquet file, but found an unreadable one"):
        read_interactions(tmp_path / "fake.parquet", "shop")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"log.csv: expected a header line and an interaction log .*, but found an empty file"),
        (
            "user_id,item_id,timestamp\n",
            r"log.csv: expected an interaction log with the columns user_id, item_id, timestamp and at least one "
            r"row, but found only the header",
        ),
        (
            "user_id,item_id,when\nu1,i1,1\n",
            r"log.csv: expected the column 'timestamp' \(required: user_id, item_id, timestamp\), "
            r"but found the columns \['user_id', 'item_id', 'when'\]",
        ),
        (
            "user_id,item_id,timestamp,item_id\nu1,i1,1,i2\n",
            r"log.csv:1: expected unique column names, but found the column 'item_id' twice \(duplicate header\)",
        ),
        (
            "user_id,item_id,timestamp\nu1,i1,1\nu1,i2,yesterday\n",
            r"log.csv:3, column 'timestamp': expected epoch seconds or an ISO 8601 time \(neither epoch seconds nor "
            r"ISO 8601\), but found 'yesterday'",
        ),
        (
            "user_id,item_id,timestamp\nu1,i1,1700000000000\n",
            r"log.csv:2, column 'timestamp': expected epoch seconds or an ISO 8601 time \(too large for epoch "
            r"seconds \(milliseconds\? divide by 1000\)\)",
        ),
        (
            "user_id,item_id,timestamp\ncust 42,i1,1\n",
            r"log.csv:2, column 'user_id': expected a user id of 1-64 characters of \[A-Za-z0-9._:@-\] \(the API's "
            r"id rule\), but found 'cust 42'",
        ),
        (
            "user_id,item_id,timestamp\nu1," + "x" * 65 + ",1\n",
            r"log.csv:2, column 'item_id': expected an item id of 1-64 characters",
        ),
        ("user_id,item_id,timestamp\nu1,,1\n", r"log.csv:2, column 'item_id': expected an item id .*, but found ''"),
        (
            "user_id,item_id,timestamp\nu1,i1\n",
            r"log.csv:2: expected 3 comma-separated fields \(as the header\), but found 2",
        ),
        (
            "user_id,item_id,timestamp,weight\nu1,i1,1,heavy\n",
            r"log.csv:2, column 'weight': expected a finite number, but found 'heavy'",
        ),
    ],
    ids=[
        "empty",
        "header-only",
        "missing-column",
        "duplicate-header",
        "timestamp",
        "milliseconds",
        "id-rule",
        "id-length",
        "empty-id",
        "field-count",
        "weight",
    ],
)
def test_each_bad_log_names_the_file_the_row_the_column_and_the_rule(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataFileError, match=message):
        read_interactions(write(tmp_path / "log.csv", text), "shop")


def test_bad_paths_and_feature_tables(tmp_path: Path) -> None:
    log = write(tmp_path / "log.csv", "user_id,item_id,timestamp\nu1,i1,1\n")
    with pytest.raises(
        DataFileError, match=r"log.json: expected a .csv or .parquet file, but found the extension '.json'"
    ):
        read_interactions(tmp_path / "log.json", "shop")
    with pytest.raises(MissingDataError, match=r"data file .*absent.csv does not exist"):
        read_interactions(tmp_path / "absent.csv", "shop")
    items = write(tmp_path / "items.csv", "item_id,a,b,c\ni1,1,2,3\n")
    with pytest.raises(
        DatasetSpecError,
        match=rf"the item feature table .*items.csv: expected at most {MAX_ITEM_FEATURES} feature columns besides "
        r"'item_id' \(the ranker's item_features tensor has 2 slots for them\), but found 3: a, b, c",
    ):
        read_interactions(log, "shop", items=items)
    twice = write(tmp_path / "twice.csv", "item_id,a\ni1,1\ni1,2\n")
    with pytest.raises(DataFileError, match=r"twice.csv:3, column 'item_id': expected one row per item_id"):
        read_interactions(log, "shop", items=twice)
    no_id = write(tmp_path / "no_id.csv", "sku,a\ni1,1\n")
    with pytest.raises(DataFileError, match=r"no_id.csv: expected a column 'item_id', but found the columns"):
        read_interactions(log, "shop", items=no_id)
    with pytest.raises(DatasetSpecError, match=r"--categorical: expected names of feature table columns"):
        read_interactions(log, "shop", categorical=("zip",))


def test_categorical_overrides_a_numeric_looking_column(tmp_path: Path) -> None:
    log = write(tmp_path / "log.csv", "user_id,item_id,timestamp\nu1,i1,1\nu2,i1,2\n")
    users = write(tmp_path / "users.csv", "user_id,zip\nu1,02139\nu2,10001\n")
    assert read_interactions(log, "shop", users=users).user_features[0].kind == "numeric"
    column = read_interactions(log, "shop", users=users, categorical=("zip",)).user_features[0]
    assert column.kind == "categorical" and column.values == ("02139", "10001")


def test_timestamps() -> None:
    assert parse_timestamp("1700000000") == parse_timestamp("1700000000.9") == 1_700_000_000
    assert parse_timestamp("2023-11-14T22:13:20") == 1_700_000_000  # no offset: UTC
    assert parse_timestamp("2023-11-14") == 1_699_920_000
    for bad in ("", "nan", "inf", "14/11/2023"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_names() -> None:
    assert check_name("shop-2024.v2") == "shop-2024.v2"
    for bad in ("", "../x", "a b", "x" * 41, "-shop"):
        with pytest.raises(DatasetSpecError, match=re.escape("--name: expected 1-40 characters of [A-Za-z0-9._-]")):
            check_name(bad)
    with pytest.raises(DatasetSpecError, match=r"expected a name other than the built-in data sets"):
        check_name("movielens")


def test_the_cli_prints_a_bad_file_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write(tmp_path / "log.csv", "user_id,item_id,timestamp\nu1,i1,1\nu1,i2,someday\n")
    build, repo = tmp_path / "build", tmp_path / "repo"
    argv = ["all", "--interactions", str(log), "--name", "shop", "--build-dir", str(build), "--repo", str(repo)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "log.csv:3, column 'timestamp'" in err and "Traceback" not in err
    assert not build.exists() and not repo.exists()
    assert main(["all", "--users", "many"]) == 2
    assert "--users: expected an integer count of synthetic entities" in capsys.readouterr().err
    assert main(["all", "--interactions", str(log)]) == 2
    assert "expected --name NAME too" in capsys.readouterr().err


def test_movielens_latest_small_is_an_adapter_onto_the_contract() -> None:
    folder = movielens_small_dir()
    if not (folder / "ratings.csv").is_file():
        pytest.skip(f"MovieLens latest-small not found at {folder}: set RECSERVE_MOVIELENS_SMALL_DIR")
    data = load_movielens_small(folder)
    assert (data.n_users, data.n_items, data.n_interactions) == (610, 9724, 100_836)
    assert data.item_feature_spec[0][0] == "genre" and data.item_feature_spec[1][0] == "year"
    assert set(np.unique(data.rating).tolist()) <= {k / 2 for k in range(1, 11)}
    assert (data.item_genre_year > 0).mean() > 0.95


def test_make_up_names_the_command_that_builds_a_missing_own_data_set() -> None:
    from stack.errors import StackError
    from stack.up import ensure_artifacts

    with pytest.raises(
        StackError,
        match=r"expected the bundle of the data set 'no-such-own-set' at .*artifacts/no-such-own-set/v1, but found "
        r"none: build it with `python -m export all --interactions FILE --name no-such-own-set`",
    ):
        ensure_artifacts("no-such-own-set")
    with pytest.raises(DatasetSpecError, match=r"--dataset: expected 1-40 characters"):
        ensure_artifacts("../x")


def test_a_bad_rows_line_counts_blank_lines_and_quoted_line_breaks(tmp_path: Path) -> None:
    text = 'user_id,item_id,timestamp,event_type\nu1,i1,1,"multi\nline"\n\nu2,i2,2,view\nu3,i3,later,view\n'
    with pytest.raises(DataFileError, match=r"log.csv:6, column 'timestamp': .* but found 'later'"):
        read_interactions(write(tmp_path / "log.csv", text), "shop")
    with pytest.raises(
        DataFileError, match=r"log.csv:6: expected 4 comma-separated fields \(as the header\), but found 3"
    ):
        read_interactions(write(tmp_path / "log.csv", text.replace("u3,i3,later,view", "u3,i3,7")), "shop")
