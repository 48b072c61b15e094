"""The one data contract: an interaction log (CSV or Parquet) with optional user and item feature tables,
read, checked and turned into a ``Dataset`` (``export.data``), which is what every later stage reads.

Every data set is an adapter onto it: an own log (``read_interactions``), MovieLens latest-small (its
``ratings.csv`` through the same reader, columns renamed, ``movies.csv`` as the item feature table), and
MovieLens 100K and the synthetic set (``export.data.load_movielens``: the u.data/u.item/u.user layout, read
by a block parser in C so 100M rows stay fast; ids are strings there too).

The interaction log (docs/DATA.md has the user-facing version):

| column | required | type | rule |
|---|---|---|---|
| ``user_id`` | yes | string | 1-64 characters of ``[A-Za-z0-9._:@-]`` (the API's id rule, orchestrator.api) |
| ``item_id`` | yes | string | the same rule |
| ``timestamp`` | yes | epoch seconds (integer or decimal) or ISO 8601 | a time without an offset is UTC |
| ``weight`` | no | number | finite; 1.0 when the column is absent |
| ``event_type`` | no | string | any label (view, click, purchase, ...); kept as a vocabulary |

Other columns are ignored. A feature table (``--users PATH``, ``--items PATH``) has the id column
(``user_id`` or ``item_id``) and feature columns; every other column is a declared feature. A column whose
every non-empty value is a finite number is numeric, unless named with ``--categorical``; the rest are
categorical. Ids in a table but not in the log are ignored; an id of the log absent from its table has
every feature unknown (0).

How features meet the models (the choice made here): the ranker's tensor contract
(``orchestrator.schema.ranker_inputs``) has fixed widths, 3 user feature columns and 3 item feature
columns, the 3rd item one the popularity decile derived from training counts. Vocabulary sizes do not
change a tensor's shape (the columns are int64 indices), so a data set declares up to
``MAX_USER_FEATURES`` = 3 user and ``MAX_ITEM_FEATURES`` = 2 item feature columns, mapped in table order
onto those slots; an unused slot is all 0. A categorical column's vocabulary is built from the data (most
frequent first; 0 = unknown or empty); a numeric one is cut into ``NUMERIC_BUCKETS`` quantile buckets
(1..10, 0 = missing). The towers' and the ranker's embedding tables are sized from these vocabularies
(``Dataset.user_feature_spec``/``item_feature_spec``, recorded in the bundle's manifest), so no data set
needs a change to ``orchestrator.schema``. More columns than slots is an error that names the limit.

A bad file is an ``export.errors.DataFileError`` naming the file, the line (CSV; Parquet: the data row)
and the column, and the rule it breaks; the pipeline reads and checks everything before it writes
anything. The reader streams: rows go into typed arrays (``array``), one dict per id kind; memory is
O(interactions + distinct ids), never users x items.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from export.data import Dataset
from export.errors import DataFileError, DatasetSpecError, MissingDataError
from orchestrator.ids import ID_MAX_LENGTH, ID_PATTERN

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_USER_FEATURES = 3  # the ranker's user_features tensor: 3 columns
MAX_ITEM_FEATURES = 2  # item_features: 3 columns, the 3rd is the derived popularity bucket
NUMERIC_BUCKETS = 10  # quantile buckets of a numeric feature (index 0: missing)
# Past this an epoch value is not seconds: 10^11 s is the year 5138, 10^12 ms is 2001.
MAX_EPOCH_SECONDS = 10**11
CHUNK_ROWS = 65_536  # rows a chunk of a log holds: its columns are checked and converted together
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
RESERVED_NAMES = ("synthetic", "synthetic-1m", "movielens", "movielens-100k", "movielens-small")
ID_RULE = re.compile(ID_PATTERN)
ID_RULE_TEXT = f"1-{ID_MAX_LENGTH} characters of [A-Za-z0-9._:@-] (the API's id rule)"


@dataclass(frozen=True)
class Columns:
    """Where the contract's columns are in a file: its own names by default, others for an adapter."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    weight: str = "weight"
    event_type: str = "event_type"

    @property
    def required(self) -> tuple[str, str, str]:
        return (self.user_id, self.item_id, self.timestamp)


@dataclass(frozen=True)
class FeatureColumn:
    """One declared feature after encoding: its slot's vocabulary (index 0 = unknown/missing)."""

    name: str
    kind: str  # "categorical" | "numeric"
    size: int  # vocabulary size, index 0 included
    values: tuple[str, ...] = ()  # categorical: the value of index k + 1
    edges: tuple[float, ...] = ()  # numeric: bucket k + 1 holds values in [edges[k-1], edges[k])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "size": self.size}
        if self.kind == "numeric":
            out["edges"] = list(self.edges)
        return out


@dataclass
class FeatureTable:
    """A feature table as read: its source (for messages), the row of each id, each column's raw values."""

    source: str
    id_column: str
    rows: dict[str, int]
    columns: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class OwnData:
    """What ``read_interactions`` returns: the data set and how its features were encoded."""

    dataset: Dataset
    user_features: tuple[FeatureColumn, ...]
    item_features: tuple[FeatureColumn, ...]

    def describe(self) -> dict[str, Any]:
        """The features part of a bundle's manifest (names, kinds, sizes, bucket edges)."""
        return {
            "user": [column.to_json() for column in self.user_features],
            "item": [column.to_json() for column in self.item_features],
        }

    def vocabularies(self) -> dict[str, dict[str, list[str]]]:
        """Each categorical column's values by index (index 0, unknown, is ""): the bundle's
        ``feature_vocabularies.json``, so a later pipeline encodes new rows as training did."""
        return {
            kind: {c.name: ["", *c.values] for c in columns if c.kind == "categorical"}
            for kind, columns in (("user", self.user_features), ("item", self.item_features))
        }


def check_name(name: str, option: str = "--name") -> str:
    """An own data set's name: it names build/artifacts/NAME and starts every model version string."""
    if not NAME_RULE.fullmatch(name):
        raise DatasetSpecError(option, "1-40 characters of [A-Za-z0-9._-], starting with a letter or digit", repr(name))
    if name in RESERVED_NAMES:
        raise DatasetSpecError(option, f"a name other than the built-in data sets {list(RESERVED_NAMES)}", repr(name))
    return name


# --------------------------------------------------------------------------------------------------
# Rows of a CSV or Parquet file


# A chunk of a table: the line (CSV) or row (Parquet) number of each of its rows, and its columns in
# header order, each a list of cells. A number is the row's ordinal among the data rows (1-based);
# ``_Table.error`` turns it into a CSV line number (quoted fields may span lines) only for the message.
Chunk = tuple[Sequence[int], list[list[Any]]]


def _is_blank(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


@dataclass
class _Table:
    """An open table: its header and its chunks of rows (``CHUNK_ROWS`` at most)."""

    path: Path
    header: list[str]
    chunks: Iterator[Chunk]
    unit: str  # "line" (CSV) or "row" (Parquet)

    @property
    def rows(self) -> Iterator[tuple[int, list[Any]]]:
        """Row by row: (number, values in header order)."""
        for numbers, columns in self.chunks:
            for number, *values in zip(numbers, *columns, strict=True):
                yield number, values

    def error(self, number: int | None, expected: str, found: str, column: str | None = None) -> DataFileError:
        """``number``: the data row's ordinal (1-based); a CSV's message names its line instead."""
        if number is not None and self.unit == "line":
            number = _csv_line_of(self.path, number)
        return DataFileError(self.path, number, expected, found, column=column, unit=self.unit)


def _csv_line_of(path: Path, ordinal: int) -> int:
    """The line on which a CSV's ``ordinal``-th data row ends (blank lines skipped, as the reader does):
    read again on an error only, so the reader need not track lines."""
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        seen = 0
        for row in reader:
            if not _is_blank(row):
                seen += 1
                if seen == ordinal:
                    return reader.line_num
    return ordinal + 1  # pragma: no cover - the row was read before


def _kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise DataFileError(path, None, "a .csv or .parquet file", f"the extension {suffix or '(none)'!r}")


def _check_header(path: Path, header: list[str], unit: str) -> None:
    seen: set[str] = set()
    for position, name in enumerate(header, start=1):
        if not name:
            raise DataFileError(
                path, 1 if unit == "line" else None, "a name for every column", f"column {position} unnamed"
            )
        if name in seen:
            raise DataFileError(
                path,
                1 if unit == "line" else None,
                "unique column names",
                f"the column {name!r} twice (duplicate header)",
            )
        seen.add(name)


def _csv_table(path: Path, what: str) -> _Table:
    handle = path.open(newline="", encoding="utf-8-sig")  # -sig: a byte-order mark is not part of a name
    reader = csv.reader(handle)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        handle.close()
        raise DataFileError(path, None, f"a header line and {what}", "an empty file") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        handle.close()
        raise DataFileError(path, 1, "UTF-8 CSV text", str(exc)) from None
    _check_header(path, header, "line")

    def chunks() -> Iterator[Chunk]:
        width, done = len(header), 0
        with handle:
            while True:
                try:
                    rows = list(islice(reader, CHUNK_ROWS))  # in C: no Python step per row
                except (UnicodeDecodeError, csv.Error) as exc:
                    raise DataFileError(path, reader.line_num, "UTF-8 CSV text", str(exc)) from None
                if not rows:
                    return
                if any(len(row) != width for row in rows):
                    rows = [row for row in rows if not _is_blank(row)]
                    for k, row in enumerate(rows):
                        if len(row) != width:
                            line = _csv_line_of(path, done + k + 1)
                            raise DataFileError(
                                path, line, f"{width} comma-separated fields (as the header)", f"{len(row)}"
                            )
                yield range(done + 1, done + 1 + len(rows)), [list(column) for column in zip(*rows, strict=True)]
                done += len(rows)

    return _Table(path, header, chunks(), "line")


def _parquet_table(path: Path, what: str) -> _Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - the export extra installs it
        raise DatasetSpecError(
            str(path), "pyarrow installed to read Parquet", "no pyarrow", "pip install -c constraints.txt '.[export]'"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise DataFileError(path, None, "a Parquet file", f"an unreadable one ({exc})") from None
    header = [str(name) for name in parquet.schema_arrow.names]
    if parquet.metadata.num_rows == 0:
        raise DataFileError(path, None, what, "no rows (an empty file)")
    _check_header(path, header, "row")

    def chunks() -> Iterator[Chunk]:
        import pyarrow as pa

        start = 1
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
            columns = []
            for column in batch.columns:
                if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
                    # Epoch seconds in C, not a datetime object per cell (a zone-less time is UTC, as in a CSV).
                    column = column.cast(pa.timestamp("s"), safe=False).cast(pa.int64())
                columns.append(column.to_pylist())
            yield range(start, start + batch.num_rows), columns
            start += batch.num_rows

    return _Table(path, header, chunks(), "row")


def _open(path: Path, what: str) -> _Table:
    path = Path(path)
    kind = _kind_of(path)
    if not path.is_file():
        raise MissingDataError(path, f"expected {what} as a .csv or .parquet file")
    return _csv_table(path, what) if kind == "csv" else _parquet_table(path, what)


def _text(value: Any) -> str:
    """A cell as text: Parquet gives ints, floats, None; CSV gives strings."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # an id column stored as float: 42.0 is the id "42"
    return str(value).strip()


def parse_timestamp(value: Any) -> int:
    """Epoch seconds of a cell: an integer or decimal number of seconds, an ISO 8601 text (no offset: UTC),
    or a Parquet timestamp/date. Raises ValueError saying why not."""
    if isinstance(value, datetime):
        stamp = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return int(stamp.timestamp())
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp())
    if isinstance(value, bool) or value is None:
        raise ValueError("not a time")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(int(text))
        except ValueError:
            try:
                seconds = float(text)
            except ValueError:
                try:
                    stamp = datetime.fromisoformat(text)
                except ValueError:
                    raise ValueError("neither epoch seconds nor ISO 8601") from None
                if stamp.tzinfo is None:
                    stamp = stamp.replace(tzinfo=UTC)
                return int(stamp.timestamp())
    if not math.isfinite(seconds):
        raise ValueError("not a finite number")
    if abs(seconds) >= MAX_EPOCH_SECONDS:
        raise ValueError("too large for epoch seconds (milliseconds? divide by 1000)")
    return int(seconds)


class _Ids:
    """Row of each distinct id in first-seen order; each new id is checked against the API's id rule."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.rows: dict[str, int] = {}
        self.ids: list[str] = []

    def rows_of(self, values: list[Any], table: _Table, numbers: Sequence[int], column: str) -> np.ndarray:
        """The rows of a chunk's ids: known ones by one dict look-up each, new ones checked one by one."""
        if values and not isinstance(values[0], str):
            values = [_text(v) for v in values]  # Parquet integer ids: "12", the key they are kept under
        get = self.rows.get
        rows = [get(v) for v in values]
        if None in rows:
            for k, row in enumerate(rows):
                if row is None:
                    rows[k] = self.row(values[k], table, numbers[k], column)
        return np.asarray(rows, dtype=np.int64)

    def row(self, value: Any, table: _Table, number: int, column: str) -> int:
        text = _text(value)
        row = self.rows.get(text)
        if row is None:
            if len(text) > ID_MAX_LENGTH or not ID_RULE.fullmatch(text):
                article = "an" if self.kind == "item" else "a"
                raise table.error(number, f"{article} {self.kind} id of {ID_RULE_TEXT}", repr(text), column)
            row = self.rows[text] = len(self.ids)
            self.ids.append(text)
        return row


# --------------------------------------------------------------------------------------------------
# Feature tables


def read_feature_table(path: Path, id_column: str) -> FeatureTable:
    """A feature table file: ``id_column`` plus feature columns, one row per id (ids checked)."""
    what = f"a feature table with a {id_column!r} column"
    table = _open(Path(path), what)
    if id_column not in table.header:
        raise table.error(None, f"a column {id_column!r}", f"the columns {table.header}")
    position = table.header.index(id_column)
    names = [name for name in table.header if name != id_column]
    out = FeatureTable(str(table.path), id_column, {}, {name: [] for name in names})
    ids = _Ids(id_column.removesuffix("_id"))
    for number, values in table.rows:
        before = len(ids.ids)
        row = ids.row(values[position], table, number, id_column)
        if row < before:
            raise table.error(
                number, f"one row per {id_column}", f"{values[position]!r} again (duplicate id)", id_column
            )
        for k, name in enumerate(table.header):
            if name != id_column:
                out.columns[name].append(_text(values[k]))
    if not ids.ids:
        raise table.error(None, what + " and at least one row", "only the header")
    out.rows = ids.rows
    return out


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def encode_column(name: str, values: Sequence[str], categorical: bool) -> tuple[FeatureColumn, np.ndarray]:
    """A feature column's values (one per entity, "" = missing) as int64 indices and its vocabulary."""
    present = [v for v in values if v != ""]
    numbers = [_number(v) for v in present]
    if not categorical and present and all(n is not None for n in numbers):
        finite = np.asarray(numbers, dtype=np.float64)
        edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, NUMERIC_BUCKETS + 1)[1:-1]))
        out = np.zeros(len(values), dtype=np.int64)
        mask = np.fromiter((v != "" for v in values), dtype=bool, count=len(values))
        column_values = np.asarray([float(v) for v in values if v != ""], dtype=np.float64)
        out[mask] = 1 + np.searchsorted(edges, column_values, side="right")
        return FeatureColumn(name, "numeric", len(edges) + 2, edges=tuple(float(e) for e in edges)), out
    counts = Counter(present)
    vocabulary = sorted(counts, key=lambda v: (-counts[v], v))
    index = {v: k + 1 for k, v in enumerate(vocabulary)}
    out = np.fromiter((index.get(v, 0) for v in values), dtype=np.int64, count=len(values))
    return FeatureColumn(name, "categorical", len(vocabulary) + 1, values=tuple(vocabulary)), out


def encode_features(
    table: FeatureTable | None, ids: list[str], slots: int, categorical: Sequence[str], kind: str
) -> tuple[tuple[FeatureColumn, ...], np.ndarray, tuple[tuple[str, int], ...]]:
    """The entities' feature matrix [len(ids), slots] (unused slots 0), the columns, and the models' spec."""
    matrix = np.zeros((len(ids), slots), dtype=np.int64)
    columns: list[FeatureColumn] = []
    if table is not None:
        names = list(table.columns)
        if len(names) > slots:
            raise DatasetSpecError(
                f"the {kind} feature table {table.source}",
                f"at most {slots} feature columns besides {table.id_column!r} (the ranker's {kind}_features "
                f"tensor has {slots} slots for them)",
                f"{len(names)}: {', '.join(names)}",
                "drop the columns the models should not see",
            )
        rows = np.fromiter((table.rows.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        for slot, name in enumerate(names):
            raw = table.columns[name]
            values = [raw[r] if r >= 0 else "" for r in rows.tolist()]
            column, encoded = encode_column(name, values, name in categorical)
            columns.append(column)
            matrix[:, slot] = encoded
    spec = tuple((c.name, c.size) for c in columns) + tuple((f"unused{k}", 1) for k in range(len(columns), slots))
    return tuple(columns), matrix, spec


# --------------------------------------------------------------------------------------------------
# The interaction log


def _timestamps(values: list[Any], table: _Table, numbers: Sequence[int], column: str) -> np.ndarray:
    """A chunk's timestamps as epoch seconds: integers parsed in C; anything else (ISO 8601, decimals, an
    error to name) cell by cell."""
    try:
        out = np.array(values, dtype=np.int64)
        if ((out > -MAX_EPOCH_SECONDS) & (out < MAX_EPOCH_SECONDS)).all():
            return out
    except (ValueError, TypeError, OverflowError):
        pass
    out = np.empty(len(values), dtype=np.int64)
    for k, value in enumerate(values):
        try:
            out[k] = parse_timestamp(value)
        except ValueError as exc:
            raise table.error(numbers[k], f"epoch seconds or an ISO 8601 time ({exc})", repr(value), column) from None
    return out


def _weights(values: list[Any], table: _Table, numbers: Sequence[int], column: str) -> np.ndarray:
    """A chunk's weights: finite numbers, parsed in C; the first bad cell is named."""
    try:
        out = np.array(values, dtype=np.float64)
        if np.isfinite(out).all():
            return out.astype(np.float32)
    except (ValueError, TypeError):
        pass
    out = np.empty(len(values), dtype=np.float64)
    for k, value in enumerate(values):
        number = _number(_text(value))
        if number is None:
            raise table.error(numbers[k], "a finite number", repr(value), column)
        out[k] = number  # what float() takes and numpy does not ("1_000")
    return out.astype(np.float32)


def read_interactions(
    path: Path,
    name: str,
    users: Path | FeatureTable | None = None,
    items: Path | FeatureTable | None = None,
    categorical: Sequence[str] = (),
    columns: Columns = Columns(),
) -> OwnData:
    """Read and check an interaction log and its feature tables into a ``Dataset`` named ``name``.

    The log is read a chunk of ``CHUNK_ROWS`` rows at a time: ids by dict look-up (a new one checked
    against the id rule), timestamps and weights parsed in C, a chunk that numpy refuses cell by cell, so
    an error names its line. Everything is checked before anything is returned; nothing is written."""
    what = f"an interaction log with the columns {', '.join(columns.required)}"
    user_table = read_feature_table(Path(users), "user_id") if isinstance(users, Path | str) else users
    item_table = read_feature_table(Path(items), "item_id") if isinstance(items, Path | str) else items
    declared = set(user_table.columns if user_table else ()) | set(item_table.columns if item_table else ())
    unknown = [c for c in categorical if c not in declared]
    if unknown:
        raise DatasetSpecError(
            "--categorical", f"names of feature table columns ({sorted(declared) or 'none given'})", ", ".join(unknown)
        )
    table = _open(Path(path), what)
    missing = [c for c in columns.required if c not in table.header]
    if missing:
        raise table.error(
            None,
            f"the column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"(required: {', '.join(columns.required)})",
            f"the columns {table.header}",
        )
    at = {column: table.header.index(column) for column in table.header}
    u_at, i_at, t_at = (at[c] for c in columns.required)
    w_at, e_at = at.get(columns.weight), at.get(columns.event_type)
    user_ids, item_ids = _Ids("user"), _Ids("item")
    event_rows: dict[str, int] = {"": 0}
    parts: dict[str, list[np.ndarray]] = {"user": [], "item": [], "stamp": [], "weight": [], "event": []}
    for numbers, cells in table.chunks:
        parts["user"].append(user_ids.rows_of(cells[u_at], table, numbers, columns.user_id))
        parts["item"].append(item_ids.rows_of(cells[i_at], table, numbers, columns.item_id))
        parts["stamp"].append(_timestamps(cells[t_at], table, numbers, columns.timestamp))
        if w_at is not None:
            parts["weight"].append(_weights(cells[w_at], table, numbers, columns.weight))
        if e_at is not None:
            labels = (_text(v) for v in cells[e_at])
            parts["event"].append(np.fromiter((event_rows.setdefault(v, len(event_rows)) for v in labels), np.int64))
    if not parts["user"]:
        raise table.error(None, what + " and at least one row", "only the header")
    user_idx, item_idx, stamps = (np.concatenate(parts[k]) for k in ("user", "item", "stamp"))
    user_columns, user_matrix, user_spec = encode_features(
        user_table, user_ids.ids, MAX_USER_FEATURES, categorical, "user"
    )
    item_columns, item_matrix, item_spec = encode_features(
        item_table, item_ids.ids, MAX_ITEM_FEATURES, categorical, "item"
    )
    dataset = Dataset(
        name=name,
        user_ids=user_ids.ids,
        item_ids=item_ids.ids,
        user_features=user_matrix,
        item_genre_year=item_matrix,
        user_idx=user_idx,
        item_idx=item_idx,
        rating=np.concatenate(parts["weight"]) if w_at is not None else np.ones(len(user_idx), np.float32),
        timestamp=stamps,
        user_feature_spec=user_spec,
        item_feature_spec=item_spec,
        event_type=np.concatenate(parts["event"]) if e_at is not None else None,
        event_types=tuple(event_rows) if e_at is not None else (),
    )
    return OwnData(dataset, user_columns, item_columns)


# --------------------------------------------------------------------------------------------------
# MovieLens latest-small: an adapter onto the contract


_YEAR = re.compile(r"\((\d{4})\)\s*$")
NO_GENRE = "(no genres listed)"


def movielens_small_items(path: Path) -> FeatureTable:
    """movies.csv (movieId,title,genres) as an item feature table: the first listed genre (categorical)
    and the release year from the title (numeric)."""
    table = _open(Path(path), "movies.csv with the columns movieId, title, genres")
    for column in ("movieId", "title", "genres"):
        if column not in table.header:
            raise table.error(None, f"a column {column!r}", f"the columns {table.header}")
    at = {name: table.header.index(name) for name in table.header}
    out = FeatureTable(str(path), "movieId", {}, {"genre": [], "year": []})
    ids = _Ids("item")
    for number, values in table.rows:
        ids.row(values[at["movieId"]], table, number, "movieId")
        genres = str(values[at["genres"]]).split("|")
        out.columns["genre"].append("" if genres[0] == NO_GENRE else genres[0])
        year = _YEAR.search(str(values[at["title"]]).strip())
        out.columns["year"].append(year.group(1) if year else "")
    out.rows = ids.rows
    return out


MOVIELENS_SMALL_FILES = ("ratings.csv", "movies.csv")


def load_movielens_small(folder: Path, name: str = "movielens-small") -> Dataset:
    """MovieLens latest-small where it lies: ``ratings.csv`` (userId,movieId,rating,timestamp) through the
    contract's reader, the rating as the weight, ``movies.csv`` as the item feature table."""
    folder = Path(folder)
    for file in MOVIELENS_SMALL_FILES:
        if not (folder / file).is_file():
            raise MissingDataError(
                folder / file, "expected a MovieLens latest-small folder with ratings.csv and movies.csv"
            )
    own = read_interactions(
        folder / "ratings.csv",
        name,
        items=movielens_small_items(folder / "movies.csv"),
        columns=Columns(user_id="userId", item_id="movieId", weight="rating"),
    )
    return own.dataset
