"""Errors of the offline pipeline. Each states what was expected, what was found, and the fix."""

from __future__ import annotations

from pathlib import Path


class ExportError(Exception):
    """Base class: everything the offline pipeline raises on purpose."""


class DataFileError(ExportError):
    def __init__(self, path: Path, line: int | None, expected: str, found: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: expected {expected}, but found {found}")
        self.path = path
        self.line = line


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
