"""Errors of the offline pipeline. Each states what was expected, what was found, and the fix."""

from __future__ import annotations

from pathlib import Path


class ExportError(Exception):
    """Base class: everything the offline pipeline raises on purpose."""


class DataFileError(ExportError):
    """A data file breaks a rule: names the file, the line (``path:N``; Parquet: ``path, row N``, counting
    data rows from 1) and the column where known, then the rule and what broke it."""

    def __init__(
        self,
        path: Path,
        line: int | None,
        expected: str,
        found: str,
        column: str | None = None,
        unit: str = "line",
    ) -> None:
        where = str(path)
        if line is not None:
            where += f":{line}" if unit == "line" else f", {unit} {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: expected {expected}, but found {found}")
        self.path = path
        self.line = line
        self.column = column


class DatasetSpecError(ExportError):
    """An own data set's command line is inconsistent: a name, a feature declaration, too many features."""

    def __init__(self, what: str, expected: str, found: str, fix: str = "") -> None:
        super().__init__(f"{what}: expected {expected}, but found {found}" + (f"; {fix}" if fix else ""))


class MissingDataError(ExportError):
    def __init__(self, path: Path, hint: str) -> None:
        super().__init__(f"data file {path} does not exist; {hint}")
        self.path = path


class ParityError(ExportError):
    def __init__(self, backend: str, batch_size: int, max_abs_diff: float, tolerance: float) -> None:
        super().__init__(
            f"{backend} export does not match eager torch at batch size {batch_size}: "
            f"max abs diff {max_abs_diff:.3g} > tolerance {tolerance:.1g}"
        )
        self.max_abs_diff = max_abs_diff


class ModelRepositoryError(ExportError):
    def __init__(self, model: str, expected: str, found: str) -> None:
        super().__init__(f"model {model!r}: expected {expected}, but found {found}")


class IndexBuildError(ExportError):
    pass
