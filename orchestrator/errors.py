"""Errors of the service outside the data plane (that one has ``orchestrator/store/errors.py``). Each states
what was expected, what was found, and the fix."""

from __future__ import annotations

from collections.abc import Iterable


class OrchestratorError(Exception):
    """Base class: everything the service raises on purpose."""


class UnknownKind(OrchestratorError, ValueError):
    """A setting names a backend the composition root's table does not hold; raised at start, before any
    traffic."""

    def __init__(self, setting: str, found: str, known: Iterable[str]) -> None:
        self.setting = setting
        self.found = found
        self.known = sorted(known)
        super().__init__(
            f"{setting} must be one of {self.known}, but found {found!r}; "
            "a new kind needs its module and one line in the table of orchestrator/composition.py"
        )


class RenamedSetting(OrchestratorError, ValueError):
    """An environment variable the service once read under another name: ignoring it would run with a
    default the operator did not choose."""

    def __init__(self, old: str, new: str) -> None:
        super().__init__(f"{old} is set, but the setting is now named {new}: rename the variable")


class MissingSetting(OrchestratorError, ValueError):
    """A backend was chosen without the setting it cannot run without."""

    def __init__(self, setting: str, needed_by: str) -> None:
        super().__init__(f"{setting} must be set for {needed_by}, but found it unset")


class UnknownUser(OrchestratorError):
    """No embedding for this user: nothing to personalise with (a fallback answers, the popular list)."""

    def __init__(self, user_id: str) -> None:
        super().__init__(f"expected an embedding for user {user_id!r}, but found none; a fallback answers")
        self.user_id = user_id


class Overloaded(OrchestratorError):
    """This process is saturated: a cache miss is answered by a fallback at once instead of computing."""

    def __init__(self, why: str) -> None:
        super().__init__(f"expected time to compute, but found {why}; a fallback answers")


class NoFallbackAnswer(OrchestratorError):
    """No fallback of the chain had a list for a request that needed one."""

    def __init__(self, reason: str, fallbacks: Iterable[str]) -> None:
        super().__init__(
            f"expected one of the fallbacks {list(fallbacks)} to answer for {reason!r}, but none had a list; "
            "end the chain with one that always answers (the popular list)"
        )
