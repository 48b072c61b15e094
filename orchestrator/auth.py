"""Who is calling: a named API key (``X-API-Key``), or for an anonymous caller, its address.

The rules (docs/RELIABILITY.md, "Who may call what"):

- A write needs a key by default; reads are open unless ``reads.require_key`` is set. A wrong key, or
  more than one key header, is 401 on every route, whatever the method.
- ``Authenticate`` runs first, before admission, body reading, parsing, rate limiting or storing: a
  request without the right key costs one SHA-256 and is answered 401.
- The caller it finds (``Caller``, in ``scope["state"]["caller"]``) names the rate-limit bucket: the key's
  name, never anything else the client sends. Only where no key is needed and none is sent is the bucket
  the client's address, and ``X-Forwarded-For`` counts for it only when the peer is a proxy the operator
  listed (``limits.trusted_proxies``).

Keys are kept only as SHA-256 digests; a presented key is hashed and compared with every stored digest in
constant time (``hmac.compare_digest``), so neither the match nor its position shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from orchestrator.errors import Unauthenticated
from orchestrator.guards import UNGUARDED_PATHS, ASGIApp, Receive, Scope, Send, send_json

API_KEY_HEADER = b"x-api-key"
_NOT_IN_ADDRESS = re.compile(r"[^A-Za-z0-9.:_-]")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Caller:
    """``name``: the key's name, or ``addr:<ip>`` for a caller without a key. ``bucket`` is what its rate
    limit is keyed on."""

    name: str
    authenticated: bool

    @property
    def bucket(self) -> str:
        return self.name


class ApiKeys:
    """Named keys, held as digests only."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._digests = tuple((_digest(key.encode()), name) for name, key in keys.items())

    def __len__(self) -> int:
        return len(self._digests)

    def name_of(self, presented: bytes) -> str | None:
        """The name of the key ``presented`` is, or None. Every stored digest is compared, whichever
        matches: the time taken does not say which one did, or how much of it."""
        digest = _digest(presented)
        found = None
        for stored, name in self._digests:
            if hmac.compare_digest(stored, digest):
                found = name
        return found


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class TrustedProxies:
    """The client's address of a request: the peer's, unless the peer is a listed proxy; then the nearest
    address in ``X-Forwarded-For`` that is not a listed proxy (read from the right, where our own proxies
    appended; whatever the client wrote itself is further left and never reached past an untrusted hop)."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def client_address(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if not self.networks or not self.trusted(peer):
            return peer
        hops = [
            hop.strip()
            for name, value in scope["headers"]
            if name == b"x-forwarded-for"
            for hop in value.decode("latin-1").split(",")
        ]
        address = peer
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break  # not an address: nothing left of it can be believed; the last good hop is the client
            address = hop
            if not self.trusted(hop):
                break
        return address


@dataclass(frozen=True)
class AccessPolicy:
    anonymous_writes: bool = False
    reads_require_key: bool = False

    def needs_key(self, method: str) -> bool:
        return self.reads_require_key if method in SAFE_METHODS else not self.anonymous_writes


class Authenticate:
    """ASGI middleware, the outermost: decides the caller or answers 401, before anything else runs."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, policy: AccessPolicy, proxies: TrustedProxies) -> None:
        self.app = app
        self.keys = keys
        self.policy = policy
        self.proxies = proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            caller = self.caller(scope)
        except Unauthenticated as exc:
            await send_json(send, exc.status, exc.detail)
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)

    def caller(self, scope: Scope) -> Caller:
        presented = [value for name, value in scope["headers"] if name == API_KEY_HEADER]
        if len(presented) > 1:
            raise Unauthenticated(f"{len(presented)} of them")
        if presented:
            name = self.keys.name_of(presented[0])
            if name is None:
                raise Unauthenticated("a key no caller holds")
            return Caller(name, authenticated=True)
        if self.policy.needs_key(scope["method"]):
            raise Unauthenticated("none")
        # An address is digits, hex and separators; anything else (a Unix socket's path) is not kept verbatim.
        address = _NOT_IN_ADDRESS.sub("_", self.proxies.client_address(scope))[:64]
        return Caller(f"addr:{address}", authenticated=False)


def caller_of(scope: Scope) -> Caller:
    """The caller ``Authenticate`` decided for this request."""
    caller: Caller = scope["state"]["caller"]
    return caller
