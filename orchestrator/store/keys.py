"""Key layout. One function per key family; every other module builds keys only through these.

- Model-versioned keys start with ``m:<version>:`` so a new version loads beside the old one and the old
  one is dropped by one ``SCAN MATCH m:<old>:*`` per node.
- Keys about one entity end in a hash tag ``{u:<id>}`` / ``{i:<id>}``. Redis Cluster and our ring both
  route by the tag, so a user's embedding, features, seen set, session and recs sit on one node and the
  user half of a request is one round trip; different users still spread over all slots.
- ``dp:active`` is the version pointer: switching versions is one SET of one key, which is atomic.
"""

from __future__ import annotations

import re

from orchestrator.store import Kind
from orchestrator.store.errors import StoreConfigError

ACTIVE_POINTER = "dp:active"
CANARY_POINTER = "dp:canary"  # "<version> <percent>": that share of users (a stable hash of the id) served by it
PREVIOUS_POINTER = "dp:previous"  # the version the last switch replaced: what ``rollback`` returns to
REPLICAS = "dp:replicas"  # sorted set: "<replica> <version>" scored by when the replica's claim expires
VERSION_CHANNEL = "recserve:version"  # pub/sub: the new active version, published after every switch
_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# The API's id rule, enforced again where ids become keys: whoever calls (HTTP, loader, CLI), no key
# embeds a character that could close the hash tag, widen a SCAN MATCH glob, or split a log line.
# Ids are embedded verbatim rather than escaped or hashed, so keys stay readable in redis-cli; '}' ends
# the tag and cannot occur in an id, so two ids never share a key.
_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
_TAG_PREFIX = {"user": "u", "item": "i"}


def check_version(version: str) -> str:
    # The version goes into SCAN MATCH patterns: glob characters would widen a delete to other versions.
    if not _VERSION_RE.fullmatch(version):
        raise StoreConfigError("model version", "must match [A-Za-z0-9._-]{1,64}", version)
    return version


def entity_tag(kind: Kind, entity_id: str) -> str:
    if not _ID_RE.fullmatch(entity_id):
        raise StoreConfigError(f"{kind} id", "must match [A-Za-z0-9._:@-]{1,64}", entity_id)
    return f"{{{_TAG_PREFIX[kind]}:{entity_id}}}"


def hash_tag(key: str) -> str:
    """The part of ``key`` that decides its slot/shard: Redis Cluster's rule, reused by our ring."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def version_prefix(version: str) -> str:
    return f"m:{check_version(version)}:"


def version_pattern(version: str) -> str:
    return version_prefix(version) + "*"


def embedding(version: str, kind: Kind, entity_id: str) -> str:
    return f"m:{version}:emb:{kind}:{entity_tag(kind, entity_id)}"


def embeddings(version: str, kind: Kind, ids: list[str] | tuple[str, ...]) -> list[str]:
    check_version(version)
    return [embedding(version, kind, i) for i in ids]


def features(version: str, kind: Kind, entity_id: str) -> str:
    return f"m:{version}:feat:{kind}:{entity_tag(kind, entity_id)}"


def version_meta(version: str) -> str:
    return version_prefix(version) + "meta"


def checkpoint(version: str, job: str) -> str:
    """Progress of a resumable job (``load:user_embeddings``, ``precompute:3of8``) for one version."""
    return version_prefix(version) + f"ckpt:{job}"


def seen(user_id: str) -> str:
    return f"seen:{entity_tag('user', user_id)}"


def session(user_id: str) -> str:
    return f"sess:{entity_tag('user', user_id)}"


def recs(user_id: str, version: str | None = None) -> str:
    """A user's pre-computed list: of one model version (``m:<version>:rec:``, loaded and dropped with it),
    or, without one, the unversioned key of data loaded before versions were kept side by side."""
    if version is None:
        return f"rec:{entity_tag('user', user_id)}"
    return f"{version_prefix(version)}rec:{entity_tag('user', user_id)}"


def popular(segment: str) -> str:
    return f"pop:{segment}"


# Online-path keys (orchestrator): the shared recommendation cache and the per-user generation share
# the user's hash tag, so one pipeline to one shard reads both.
EVENTS_STREAM = "events"
INVALIDATION_CHANNEL = "recserve:invalidate"


def rec_cache(user_id: str) -> str:
    """Hash: cache-context field -> cached list. DEL of this one key drops every context: O(1)."""
    return f"rc:{entity_tag('user', user_id)}"


def generation(user_id: str) -> str:
    """Counter bumped on every invalidation; a cached list stamped with an older value is stale."""
    return f"gen:{entity_tag('user', user_id)}"


_BUCKET_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,80}$")


def rate_bucket(scope: str, caller: str) -> str:
    """Token bucket of one caller (a key's name, or ``addr:<ip>``) for ``scope`` (writes, reads). Lives only
    until the bucket would be full again (orchestrator/ratelimit.py sets the TTL)."""
    if not _BUCKET_RE.fullmatch(caller) or not _BUCKET_RE.fullmatch(scope):
        raise StoreConfigError("rate-limit caller", "must match [A-Za-z0-9._:@-]{1,80}", caller)
    return f"rl:{scope}:{{{caller}}}"


def event_id(user_id: str, client_event_id: str) -> str:
    """A client-supplied event id already taken for this user: the stream entry it was stored as ("pending"
    while it is being stored). Shares the user's hash tag: one round trip with the user's other keys."""
    if not _ID_RE.fullmatch(client_event_id):
        raise StoreConfigError("event id", "must match [A-Za-z0-9._:@-]{1,64}", client_event_id)
    return f"evid:{entity_tag('user', user_id)}:{client_event_id}"
