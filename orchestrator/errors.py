"""Errors of the service outside the data plane (that one has ``orchestrator/store/errors.py``). Each states
what was expected, what was found, and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


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


@dataclass(frozen=True)
class UserRead:
    """What the real-time path read of a user before it gave up on them (``UnknownUser``): the fallbacks
    (orchestrator/fallback.py) answer from it instead of reading it again."""

    segment: str  # from their feature row (``schema.user_segment``); the global segment without one
    seen: frozenset[str]  # what they bought
    session: np.ndarray | None  # their session vector (orchestrator/session.py); None: no event in the window
    touched: frozenset[str]  # the items of their session's events in the window


class UnknownUser(OrchestratorError):
    """No embedding for this user: nothing to personalise with. A fallback answers: items like those of the
    user's session, else their segment's popular list. ``read``: what the real-time path read of the user
    before it found out (their feature row's segment, bought items, session), so that no fallback reads it
    again; every request waiting on the computation gets this one error, and so the read too."""

    def __init__(self, user_id: str, read: UserRead | None = None) -> None:
        super().__init__(f"expected an embedding for user {user_id!r}, but found none; a fallback answers")
        self.user_id = user_id
        self.read = read


class Overloaded(OrchestratorError):
    """This process is saturated: a cache miss is answered by a fallback at once instead of computing."""

    def __init__(self, why: str) -> None:
        super().__init__(f"expected time to compute, but found {why}; a fallback answers")


class Shed(Overloaded):
    """Every computation slot is taken (``orchestrator/admission.py``): the request is answered from the
    fallback at once instead of computing past what the process can finish in time."""

    def __init__(self) -> None:
        super().__init__("every computation slot taken (as many computations in flight as admitted now)")


class LoopLate(Overloaded):
    """A read or the ranking missed its deadline while this process's event loop ran late: the time went to
    this process's own backlog, not to a slow or dead dependency."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} while the event loop ran late")


class ComputationAbandoned(OrchestratorError):
    """No request waits for a computation any more (each was answered or went away): it stops at its next
    stage instead of working on for nobody. Raised inside the computation's own task only."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"expected a request waiting for this computation, but found none; stopped before {stage}")


class NoFallbackAnswer(OrchestratorError):
    """No fallback of the chain had a list for a request that needed one."""

    def __init__(self, reason: str, fallbacks: Iterable[str]) -> None:
        super().__init__(
            f"expected one of the fallbacks {list(fallbacks)} to answer for {reason!r}, but none had a list; "
            "end the chain with one that always answers (the popular list)"
        )


class ClientError(OrchestratorError):
    """The request is wrong, not the service: ``status`` is its HTTP code (one exception handler in
    ``orchestrator/app.py`` answers every one of these with ``{"detail": message}``, and logs no traceback)."""

    status = 400

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.detail = message
        self.headers = headers or {}


class Unauthenticated(ClientError):
    """No X-API-Key where one is needed, a key no name holds, or more than one key."""

    status = 401

    def __init__(self, found: str) -> None:
        # One message for every case the key alone decides: it tells a prober nothing about the keys.
        super().__init__(f"expected one valid X-API-Key header, but found {found}")


class RateLimited(ClientError):
    """The caller is past its burst; ``Retry-After`` says when a token is back."""

    status = 429

    def __init__(self, what: str, rate_per_s: float, wait_s: float) -> None:
        super().__init__(
            f"rate limit of {rate_per_s:g} {what}/s exceeded; retry after {max(1, round(wait_s))} s",
            {"Retry-After": str(max(1, round(wait_s)))},
        )


class TelemetryUnavailable(OrchestratorError, RuntimeError):
    """Tracing was turned on without the packages it needs: raised at start, before any traffic."""

    def __init__(self, endpoint: str, missing: str) -> None:
        super().__init__(
            f"expected the OpenTelemetry packages for tracing to {endpoint} (RECSERVE_TELEMETRY_OTLP_ENDPOINT), "
            f"but {missing} is not installed: install the extra (pip install 'recserve[telemetry]') or unset "
            "RECSERVE_TELEMETRY_OTLP_ENDPOINT"
        )
