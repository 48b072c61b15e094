"""The API key ``make up`` starts the orchestrator with (writes need one: docs/RELIABILITY.md).

``stack_api_key`` keeps the operator's keys when ``RECSERVE_EVENTS_API_KEYS`` is set and otherwise makes
one (``stack:<random>``); the supervisor passes the returned settings to the orchestrator and writes them
to ``build/stack.env`` (mode 0600) with the others, and prints ``sample_requests`` with the key.
"""

from __future__ import annotations

import secrets
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

API_KEYS_VARIABLE = "RECSERVE_EVENTS_API_KEYS"
STACK_KEY_NAME = "stack"


@dataclass(frozen=True)
class StackApiKey:
    settings: dict[str, str]  # what to add to the orchestrator's environment (and build/stack.env)
    key: str  # the key the sample requests send
    generated: bool


def stack_api_key(environ: Mapping[str, str]) -> StackApiKey:
    """The operator's keys if set (the first one is the one the samples use), else a fresh one."""
    configured = environ.get(API_KEYS_VARIABLE, "").strip()
    if configured:
        first = configured.replace("\n", ",").split(",")[0]
        return StackApiKey({}, first.partition(":")[2].strip(), generated=False)
    key = secrets.token_urlsafe(24)
    return StackApiKey({API_KEYS_VARIABLE: f"{STACK_KEY_NAME}:{key}"}, key, generated=True)


def sample_requests(api_url: str, key: str, user_id: str, item_id: str) -> list[str]:
    """curl lines for a read and a write; the write carries the key."""
    event = f'{{"user_id": "{user_id}", "item_id": "{item_id}", "type": "click"}}'
    return [
        f"curl {shlex.quote(f'{api_url}/v1/recommendations/{user_id}?n=5')}",
        f"curl -X POST {shlex.quote(api_url + '/v1/events')} -H 'content-type: application/json' "
        f"-H {shlex.quote('X-API-Key: ' + key)} -d {shlex.quote(event)}",
    ]
