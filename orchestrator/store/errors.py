"""Errors of the data plane. Each states what was expected, what was found, and the fix.

Callers on the request path catch ``StoreUnavailable`` (and its subclasses) to fall back; everything else
is a bug or corrupt data and propagates.
"""

from __future__ import annotations

from collections.abc import Sequence


class StoreError(Exception):
    """Base class: everything the data plane raises on purpose."""


class StoreConfigError(StoreError, ValueError):
    """A setting breaks a rule; raised at start-up, before any traffic."""

    def __init__(self, setting: str, rule: str, found: object) -> None:
        super().__init__(f"{setting} {rule}, but found {found!r}")


class CorruptValueError(StoreError):
    """A stored value does not decode to what the active version promises."""

    def __init__(self, key: str, expected: str, found: str) -> None:
        super().__init__(
            f"value at {key!r}: expected {expected}, but found {found}; reload the version with `python -m export load`"
        )
        self.key = key


class ShapeError(StoreError, ValueError):
    """A caller handed a write the wrong shape, dtype or values."""

    def __init__(self, what: str, expected: str, found: str) -> None:
        super().__init__(f"{what}: expected {expected}, but found {found}")


class StoreUnavailable(StoreError):
    """Some shards/nodes did not answer in time (down, hung, or partitioned)."""

    def __init__(self, operation: str, groups: Sequence[str], timed_out: Sequence[str] = ()) -> None:
        super().__init__(f"{operation}: expected every shard to answer, but {', '.join(groups)} did not")
        self.groups = tuple(groups)
        self.timed_out = tuple(timed_out)  # of ``groups``, those that missed their deadline (not refused)

    @property
    def only_timed_out(self) -> bool:
        """Every group that failed missed its deadline: the shard may be fine and the caller late."""
        return bool(self.groups) and set(self.groups) <= set(self.timed_out)


class VersionError(StoreError):
    """The version pointer or a version's metadata is missing or inconsistent."""

    def __init__(self, expected: str, found: str, fix: str = "load a version with `python -m export load`") -> None:
        super().__init__(f"expected {expected}, but found {found}; {fix}")
