"""Who may call what, in process (no services): named keys, 401 before anything else, buckets no header
the client chooses can pick, X-Forwarded-For only from listed proxies, and bad JSON of every kind a 4xx
with a message on both routes, with no traceback in the log."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from orchestrator.app import create_app
from orchestrator.auth import ApiKeys, TrustedProxies
from orchestrator.config import EventsSettings, LimitsSettings, ReadsSettings, Settings, read_api_keys_file
from orchestrator.ratelimit import Limit, Limiters, LocalLimiter

KEY, OTHER_KEY = "key-of-search-0123456789", "key-of-cart-0123456789ab"
CATALOGUE = frozenset({"12", "13"})


class Recorder:
    def __init__(self) -> None:
        self.taken: list[tuple[str, str, str, str | None]] = []

    async def record(
        self, user_id: str, item_id: str, event_type: str, event_id: str | None = None, request_id: str | None = None
    ) -> str:
        self.taken.append((user_id, item_id, event_type, event_id))
        return f"{len(self.taken)}-0"


class CountingLimiter:
    """Local buckets that also remember which buckets were asked for."""

    def __init__(self, limit: Limit) -> None:
        self.local = LocalLimiter(limit, clock=lambda: 0.0)  # a clock that stands still: no refill
        self.asked: list[str] = []

    async def wait_s(self, bucket: str) -> float:
        self.asked.append(bucket)
        return await self.local.wait_s(bucket)


def app_with(settings: Settings, hot_route: bool = True, burst: int = 3) -> tuple[Any, Recorder, CountingLimiter]:
    from orchestrator.config import Ablations

    app = create_app(settings, Ablations(hot_route_enabled=hot_route))
    recorder = Recorder()
    limit = Limit(rate_per_s=1, burst=burst)
    limiter = CountingLimiter(limit)
    app.state.services = SimpleNamespace(
        settings=settings,
        limiters=Limiters(limiter, limiter, limit, limit),
        events=recorder,
        catalogue=CATALOGUE,
        recommender=None,
    )
    return app, recorder, limiter


def keyed(**events: Any) -> Settings:
    return Settings(events=EventsSettings(api_keys=SecretStr(f"search:{KEY},cart:{OTHER_KEY}"), **events))


def client(app: Any, peer: str = "203.0.113.9") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


EVENT = {"user_id": "7", "item_id": "12", "type": "click"}


# -- 1. writes need a named key; 401 before anything else ------------------------------------------------


@pytest.mark.parametrize("hot_route", [True, False])
async def test_a_write_without_the_right_key_is_401_before_its_body_is_read(hot_route: bool) -> None:
    app, recorder, limiter = app_with(keyed(), hot_route)
    refusals = [{}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY[:-1]}, {"X-API-Key": ""}]
    async with client(app) as http:
        for headers in refusals:
            # A body that would be a 422 (and one too big for the limit) still gets 401: nothing was read.
            for body in (b'{"user_id": NaN}', b"x" * 100_000):
                response = await http.post(
                    "/v1/events", content=body, headers=headers | {"content-type": "application/json"}
                )
                assert response.status_code == 401, (headers, response.text)
                assert response.json()["detail"].startswith("expected one valid X-API-Key header")
        two = await http.post("/v1/events", json=EVENT, headers=[("X-API-Key", KEY), ("X-API-Key", OTHER_KEY)])
        assert two.status_code == 401 and "2 of them" in two.json()["detail"]
        ok = await http.post("/v1/events", json=EVENT, headers={"X-API-Key": KEY})
        assert ok.status_code == 202, ok.text
    assert recorder.taken == [("7", "12", "click", None)]
    assert limiter.asked == ["search"]  # no refused request was even counted against a bucket


async def test_keys_are_held_hashed_and_matched_by_name() -> None:
    keys = ApiKeys({"search": KEY, "cart": OTHER_KEY})
    assert keys.name_of(KEY.encode()) == "search" and keys.name_of(OTHER_KEY.encode()) == "cart"
    assert keys.name_of(b"nope") is None and keys.name_of(b"") is None
    assert KEY not in repr(vars(keys)) and KEY.encode() not in repr(vars(keys)).encode()


def test_key_settings_state_their_rule_and_never_the_key(tmp_path: Path) -> None:
    for bad, rule in [
        ("just-a-key-0123456789", r"entry 1 must be name:key"),
        ("a:short", r"the key of 'a' must be at least 16 characters"),
        (f"a:{KEY},a:{OTHER_KEY}", r"the name 'a' is given twice"),
    ]:
        with pytest.raises(ValidationError, match=rule) as caught:
            EventsSettings(api_keys=SecretStr(bad))
        assert KEY not in str(caught.value) and "0123456789" not in str(caught.value)
    # A mounted Kubernetes Secret: one file per key, named after it; its ..data links are skipped.
    mount = tmp_path / "api-keys"
    mount.mkdir()
    (mount / "search").write_text(KEY + "\n")
    (mount / "..data").mkdir()
    assert read_api_keys_file(mount) == {"search": KEY}
    listing = tmp_path / "keys.txt"
    listing.write_text(f"search:{KEY}\ncart:{OTHER_KEY}\n")
    settings = Settings(events=EventsSettings(api_keys=SecretStr(f"loadtest:{KEY}x"), api_keys_file=listing))
    assert settings.api_keys() == {"loadtest": KEY + "x", "search": KEY, "cart": OTHER_KEY}


async def test_anonymous_writes_are_an_explicit_opt_in_and_a_wrong_key_stays_401() -> None:
    app, _, limiter = app_with(keyed(anonymous_writes=True))
    async with client(app) as http:
        assert (await http.post("/v1/events", json=EVENT)).status_code == 202
        assert (await http.post("/v1/events", json=EVENT, headers={"X-API-Key": "wrong"})).status_code == 401
    assert limiter.asked == ["addr:203.0.113.9"]


async def test_reads_are_open_by_default_and_closed_with_the_setting() -> None:
    closed = Settings(events=EventsSettings(api_keys=SecretStr(f"search:{KEY}")), reads=ReadsSettings(require_key=True))
    for settings, status in [(keyed(), 422), (closed, 401)]:
        app, _, _ = app_with(settings)
        async with client(app) as http:
            # n=0 is a 422 once past authentication: the status says which side of it the request stopped.
            assert (await http.get("/v1/recommendations/7?n=0")).status_code == status
            assert (await http.get("/v1/recommendations/7?n=0", headers={"X-API-Key": "bad"})).status_code == 401
            assert (await http.get("/healthz")).status_code == 200  # probes never need a key


# -- 2. buckets no client header can pick ----------------------------------------------------------------


async def test_each_key_has_its_own_bucket_and_no_header_makes_a_new_one() -> None:
    app, _, limiter = app_with(keyed(), burst=3)
    async with client(app) as http:
        statuses = []
        for i in range(6):
            # Spoofed identities: none of them may pick the bucket.
            headers = {"X-API-Key": KEY, "X-Forwarded-For": f"198.51.100.{i}", "X-Client-Id": str(i)}
            statuses.append((await http.post("/v1/events", json=EVENT, headers=headers)).status_code)
        other = await http.post("/v1/events", json=EVENT, headers={"X-API-Key": OTHER_KEY})
    assert statuses == [202, 202, 202, 429, 429, 429]
    assert other.status_code == 202  # another caller's burst is its own
    assert set(limiter.asked) == {"search", "cart"}


async def test_a_forwarded_address_counts_only_from_a_listed_proxy() -> None:
    """The forwarded-header bypass: an anonymous writer that rotates X-Forwarded-For gets no new bucket,
    unless the peer is a proxy the operator listed (then the proxy's appended address counts)."""
    untrusted = Settings(events=EventsSettings(anonymous_writes=True))
    app, _, limiter = app_with(untrusted, burst=3)
    async with client(app, peer="203.0.113.9") as http:
        statuses = [
            (await http.post("/v1/events", json=EVENT, headers={"X-Forwarded-For": f"198.51.100.{i}"})).status_code
            for i in range(6)
        ]
    assert statuses == [202, 202, 202, 429, 429, 429]
    assert set(limiter.asked) == {"addr:203.0.113.9"}

    behind_proxy = Settings(
        events=EventsSettings(anonymous_writes=True), limits=LimitsSettings(trusted_proxies="10.0.0.0/8")
    )
    app, _, limiter = app_with(behind_proxy, burst=3)
    async with client(app, peer="10.1.2.3") as http:
        # What the client wrote itself is left of what our proxy appended: it is never reached.
        forged = {"X-Forwarded-For": "1.1.1.1, 198.51.100.7"}
        await http.post("/v1/events", json=EVENT, headers=forged)
        await http.post("/v1/events", json=EVENT, headers={"X-Forwarded-For": "198.51.100.8, 10.9.9.9"})
    assert limiter.asked == ["addr:198.51.100.7", "addr:198.51.100.8"]


def test_the_client_address_walks_forwarded_hops_from_the_right() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "fd00::/8"])

    def address(peer: str, *forwarded: str) -> str:
        headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
        return proxies.client_address({"client": (peer, 1), "headers": headers})

    assert address("203.0.113.9", "1.2.3.4") == "203.0.113.9"  # not a proxy: the header is ignored
    assert address("10.0.0.1", "1.2.3.4") == "1.2.3.4"
    assert address("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2") == "1.2.3.4"
    assert address("10.0.0.1", "6.6.6.6", "1.2.3.4") == "1.2.3.4"  # two headers read as one list
    assert address("10.0.0.1", "not-an-ip, 1.2.3.4") == "1.2.3.4"
    assert address("10.0.0.1", "1.2.3.4, garbage") == "10.0.0.1"  # nothing past a bad hop is believed
    assert address("10.0.0.1") == "10.0.0.1"
    assert address("fd00::1", "2001:db8::5") == "2001:db8::5"
    with pytest.raises(ValidationError, match=r"trusted_proxies must be CIDRs like 10.0.0.0/8, but found 'ten'"):
        LimitsSettings(trusted_proxies="10.0.0.0/8, ten")


# -- 3. bad JSON of every kind: a 4xx with a message, both routes, no traceback --------------------------

BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b'{"user_id": NaN, "item_id": "12", "type": "view"}', 422, "NaN is not a JSON number"),
    (b'{"user_id": "7", "item_id": "12", "type": "view", "w": Infinity}', 422, "Infinity is not a JSON number"),
    (b'{"user_id": "7", "item_id": "12", "type": "view", "w": -Infinity}', 422, "-Infinity is not a JSON number"),
    (b'{"user_id": "7", "item_id": "12", "type": "view", "w": 1e999}', 422, "out of range"),
    (b'{"user_id": "7", "user_id": "8", "item_id": "12", "type": "view"}', 422, "duplicate key 'user_id'"),
    (b"[" * 2000 + b"]" * 2000, 400, "nesting too deep"),
    (b'{"user_id": "\xff\xfe", "item_id": "12", "type": "view"}', 400, "in UTF-8, but found bytes that are not"),
    (b'{"user_id": 7, "item_id": "12", "type": "view"}', 422, "valid string"),
    (b'{"user_id": ["7"], "item_id": {"a": 1}, "type": true}', 422, "valid string"),
    (b'{"user_id": "7", "item_id": "12", "type": "view", "event_id": 5}', 422, "valid string"),
    (b'"just a string"', 422, "valid dictionary"),
    (b"{", 422, "JSON decode error"),
    (b'{"user_id": "7", "item_id": "999", "type": "view"}', 422, "an item of the catalogue"),
]


@pytest.mark.parametrize("hot_route", [True, False])
async def test_bad_json_of_every_kind_is_a_4xx_with_a_message_and_no_traceback(
    hot_route: bool, caplog: pytest.LogCaptureFixture
) -> None:
    app, recorder, _ = app_with(keyed(), hot_route, burst=1000)
    caplog.set_level(logging.DEBUG)
    async with client(app) as http:
        for body, status, message in BAD_BODIES:
            response = await http.post(
                "/v1/events", content=body, headers={"X-API-Key": KEY, "content-type": "application/json"}
            )
            assert response.status_code == status, (body[:60], response.text)
            assert message in response.text, (body[:60], response.text)
    assert recorder.taken == []
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_no_redirect_is_built_from_the_host_header() -> None:
    app, _, _ = app_with(keyed())
    async with client(app) as http:
        response = await http.get("/v1/segments/global/recommendations/", headers={"Host": "evil.example"})
    assert response.status_code == 404 and "location" not in response.headers
