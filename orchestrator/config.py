"""Service settings, grouped by concern: typed, with units in the names, read from ``RECSERVE_<GROUP>_<FIELD>``
environment variables (``RECSERVE_REDIS_TIMEOUT_MS`` is ``redis.timeout_ms``) and validated at start (a bad
value stops the service with the rule it broke; a misspelt field of a group, too).

The switches that only the benchmarks flip are not production settings: they are ``Ablations``
(``RECSERVE_ABLATION_*``, docs/LOADTEST.md). README's configuration table is printed from these classes
(``python -m orchestrator.config --markdown``) and a unit test pins that the two agree.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.errors import RenamedSetting
from orchestrator.store.backend import ConnectionOptions
from orchestrator.store.features import SESSION_CAP

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "RECSERVE_"
ABLATION_ENV_PREFIX = "RECSERVE_ABLATION_"


def _positive(value: float) -> float:
    if not value > 0:  # NaN too
        raise ValueError(f"must be > 0, got {value}")
    return value


def _at_least_one(value: int) -> int:
    if value < 1:
        raise ValueError(f"must be an integer >= 1, got {value}")
    return value


def _off_or_positive(value: float) -> float:
    if not value >= 0:  # NaN too
        raise ValueError(f"must be >= 0 (0 turns it off), got {value}")
    return value


def _not_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"must be an integer >= 0, got {value}")
    return value


# The rule travels with the type: every field of one of these types is checked the same way.
Positive = Annotated[float, AfterValidator(_positive)]
AtLeastOne = Annotated[int, AfterValidator(_at_least_one)]
ZeroTurnsOff = Annotated[float, AfterValidator(_off_or_positive)]
NotNegative = Annotated[int, AfterValidator(_not_negative)]


class Group(BaseModel):
    # extra="forbid": RECSERVE_REDIS_TIMOUT_MS (a typo) stops the service instead of being ignored.
    # Field docstrings are the descriptions: README's table is printed from them. An error names the field and
    # the rule, never the input: the input of the redis group holds the password.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, hide_input_in_errors=True)


class RedisSettings(Group):
    """The Redis deployment behind every store, the cache and the invalidation channel."""

    urls: str = "redis://127.0.0.1:6379/0"
    """Comma-separated Redis URLs. Standalone mode: one or more shards on a hash ring. Cluster mode: any one node
    of the Redis Cluster."""
    mode: str = "sharded"
    """Topology of the URLs: `sharded` (standalone servers on a hash ring) or `cluster` (Redis Cluster); the
    composition root's table (orchestrator/composition.py) names the known ones."""
    timeout_ms: Positive = 25.0
    """Per-shard deadline of one batch read."""
    username: str | None = None
    """Redis ACL user (unset: the URL's user, else 'default'). A user in the URL wins."""
    password: SecretStr | None = None
    """Password of the Redis ACL user (from a Secret); never logged. A password in the URL wins."""
    tls_ca_file: Path | None = None
    """CA bundle that signed the Redis servers' certificates; used with rediss:// URLs."""
    max_connections: AtLeastOne = 64
    """Connections per Redis shard/node per process; a burst beyond it waits for a free one."""
    pool_timeout_ms: Positive = 1000.0
    """How long a command waits for a free pooled connection before the shard counts as unavailable (on the
    request path the per-shard deadline usually ends the wait first)."""

    @model_validator(mode="after")
    def _reachable(self) -> RedisSettings:
        if not self.url_list:
            raise ValueError("urls must name at least one Redis URL")
        if self.tls_ca_file is not None and not self.tls_ca_file.is_file():
            raise ValueError(f"tls_ca_file must be a readable file, got {str(self.tls_ca_file)!r}")
        return self

    @property
    def url_list(self) -> list[str]:
        return [url.strip() for url in self.urls.split(",") if url.strip()]

    @property
    def connection(self) -> ConnectionOptions:
        """How every Redis client of this process connects (credentials, TLS, bounded pools)."""
        return ConnectionOptions(
            username=self.username,
            password=self.password.get_secret_value() if self.password else None,
            ca_file=self.tls_ca_file,
            max_connections=self.max_connections,
            pool_timeout_s=self.pool_timeout_ms / 1000,
            connect_timeout_s=max(self.timeout_ms / 1000, 0.5),
        )


class TritonSettings(Group):
    """The production ranker: Triton over gRPC, behind a circuit breaker."""

    url: str | None = None
    """Triton gRPC address (host:port, or dns:///name:port for client-side round robin over a headless
    Service). Unset: rank in process with ONNX Runtime."""
    model: str = "ranker_onnx"
    """Triton model that ranks."""
    max_connection_age_s: Positive = 300.0
    """Reconnect (and re-resolve DNS) this often, so new Triton pods get traffic."""
    breaker_failures: AtLeastOne = 5
    """Consecutive Triton failures that open the circuit (calls then fail at once, to the fallback)."""
    breaker_reset_s: Positive = 2.0
    """How long an open circuit waits before letting one probe call through."""


class OnnxSettings(Group):
    """The embedded ranker: ONNX Runtime in process, used when no Triton address is set."""

    model_path: Path = REPO_ROOT / "model_repository" / "ranker_onnx" / "1" / "model.onnx"
    """Ranker model of the in-process backend (used when RECSERVE_TRITON_URL is unset). `{version}` in it stands
    for the active model version's number (`ranker_onnx/{version}/model.onnx`), so a new version is found."""


class IndexSettings(Group):
    """The FAISS item index, in process."""

    path: Path = REPO_ROOT / "build" / "artifacts" / "synthetic" / "v1" / "item_index.faiss"
    """FAISS item index; its manifest sits beside it (.json). `{version}` in it stands for the active model
    version's number (`build/artifacts/synthetic/v{version}/item_index.faiss`), so a new version is found."""
    inline_max_ms: ZeroTurnsOff = 1.0
    """FAISS searches measured at start to take at most this long run on the event loop (a thread hop costs
    more than a short search); longer ones run in a thread; 0: always a thread."""


class RankingSettings(Group):
    """How much is ranked per request, and how much of the ranking is kept."""

    n_candidates: AtLeastOne = 200
    """Candidates retrieved from the index and ranked per request."""
    list_length: AtLeastOne = 100
    """Items kept of each list ranked in real time: the list cached per user and context, of which a request
    for n items gets the first n. Not the API's limit (n is at most 100 there): a request for more than this
    gets this many."""

    @model_validator(mode="after")
    def _fits(self) -> RankingSettings:
        if self.list_length > self.n_candidates:
            raise ValueError(f"list_length ({self.list_length}) must be <= n_candidates ({self.n_candidates})")
        return self


class DeadlineSettings(Group):
    """The time budget of one recommendation request."""

    request_ms: Positive = 100.0
    """End-to-end budget of one recommendation request."""
    fallback_reserve_ms: float = 20.0
    """Part of the budget kept for the fallback path (pre-computed, then popular)."""
    min_compute_ms: float = 20.0
    """Compute in real time only if this much of the budget is left after the cache lookup; else answer from
    the fallback at once (sheds work when the process is saturated)."""

    @model_validator(mode="after")
    def _budget(self) -> DeadlineSettings:
        if not 0 <= self.fallback_reserve_ms < self.request_ms:
            raise ValueError(
                f"fallback_reserve_ms must be in 0..request_ms ({self.request_ms}), got {self.fallback_reserve_ms}"
            )
        realtime_ms = self.request_ms - self.fallback_reserve_ms
        if not 0 <= self.min_compute_ms <= realtime_ms:
            raise ValueError(
                f"min_compute_ms must be in 0..request_ms - fallback_reserve_ms ({realtime_ms}), "
                f"got {self.min_compute_ms}"
            )
        return self


class WarmupSettings(Group):
    """The pass over the compute path before the first request."""

    timeout_s: ZeroTurnsOff = 5.0
    """At start, before serving, one pass over the compute path with a zero user vector (retrieval, the
    candidates' Redis reads, one Triton ranking) may take this long; 0 skips it."""


class OverloadSettings(Group):
    """How the process answers while it cannot keep up (docs/RELIABILITY.md)."""

    loop_lag_ms: ZeroTurnsOff = 5.0
    """The event loop runs late when its lag (moving average, orchestrator/loop_lag.py) reaches this: a read or
    ranking that then misses its deadline says `loop_late`, not `deadline`/`store_unavailable` (and with admission
    by capacity switched off, an ablation, a cache miss then answers from the fallback instead of computing);
    0 turns it off."""
    hold_s: ZeroTurnsOff = 2.0
    """A fallback answered because this process was overloaded (shed, loop_late, overload, deadline) is kept in
    the local cache this long, so that the user's next requests do not compute under the same overload; an
    event evicts it like any list. 0 turns it off."""


def _percent(value: int) -> int:
    if not 1 <= value <= 100:
        raise ValueError(f"must be an integer in 1..100, got {value}")
    return value


Percent = Annotated[int, AfterValidator(_percent)]


class AdmissionSettings(Group):
    """How many real-time computations run at once (orchestrator/admission.py: AIMD on their outcome); a cache
    miss beyond the limit answers from the pre-computed list at once (fallback reason `shed`)."""

    initial_limit: AtLeastOne = 8
    """Computations admitted at once at start; the limit then follows their outcome."""
    min_limit: AtLeastOne = 2
    """The limit never falls below this: some computations always run, so the cache refills."""
    max_limit: AtLeastOne = 64
    """The limit never rises above this. Equal to min_limit and initial_limit: a fixed limit."""
    slow_percent: Percent = 50
    """A computation that takes more than this percentage of the real-time budget (deadline.request_ms -
    deadline.fallback_reserve_ms) counts as a miss, as one past its deadline does: the limit backs off while
    computations still finish in time."""
    backoff_percent: Percent = 90
    """A miss sets the limit to this percentage of itself (once per window of computations in flight); 100 never
    backs off."""

    @model_validator(mode="after")
    def _ordered(self) -> AdmissionSettings:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError(
                f"limits must satisfy min_limit <= initial_limit <= max_limit, got {self.min_limit}, "
                f"{self.initial_limit}, {self.max_limit}"
            )
        return self


class CacheSettings(Group):
    """The recommendation cache: the in-process layer, the shared Redis layer, and invalidation."""

    local_size: AtLeastOne = 100_000
    """Entries in the in-process LRU cache."""
    local_ttl_s: Positive = 30.0
    """Lifetime of a local cache entry: bounds what events do not invalidate (a new model version)."""
    invalidation_max_silence_s: Positive = 1.0
    """Hard bound on cross-replica staleness after an event: the local layer answers only while the
    invalidation channel has proven itself alive this recently (else the Redis layer answers)."""
    redis_ttl_s: AtLeastOne = 300
    """Lifetime of a shared (Redis) cache entry."""
    item_rows: NotNegative = 50_000
    """Items whose embedding and feature row a process keeps per model version (orchestrator/store/item_rows.py),
    the least recently read evicted first: a cache miss reads only the candidates it lacks from Redis. About
    540 bytes per item at dim 128; 0: every miss reads all its candidates from Redis."""
    item_rows_ttl_s: Positive = 300.0
    """Lifetime of a kept item row: bounds how long a rerun load that rewrote a version's item rows goes unseen."""


def _share_percent(value: int) -> int:
    if not 0 <= value <= 100:
        raise ValueError(f"must be an integer in 0..100, got {value}")
    return value


def _session_events(value: int) -> int:
    if not 0 <= value <= SESSION_CAP:
        raise ValueError(f"must be an integer in 0..{SESSION_CAP} (the events a session list keeps), got {value}")
    return value


SharePercent = Annotated[int, AfterValidator(_share_percent)]
SessionEvents = Annotated[int, AfterValidator(_session_events)]


class SessionSettings(Group):
    """How the user's recent events (POST /v1/events) shift the next answer without retraining
    (docs/SESSION.md): the query vector moves toward the items they touched, before retrieval."""

    max_events: SessionEvents = 10
    """Most recent session events read per request, in the same round trip as the user's embedding; 0 turns
    session-aware serving off (no session read, and views and clicks no longer invalidate cached lists)."""
    window_s: Positive = 1800.0
    """Events older than this do not count: the session."""
    half_life_s: Positive = 600.0
    """An event counts half as much this much later (a click now outweighs one from 20 minutes ago)."""
    share_percent: SharePercent = 50
    """Share of the session in a known user's query (orchestrator/session.py's alpha, in percent): their embedding
    blended with the weighted mean of the touched items' (scaled to the embedding's norm); 0: their answer
    ignores the session. A user without an embedding gets items like those of the session whatever the share."""

    @property
    def alpha(self) -> float:
        """``share_percent`` as the fraction ``session.blend_query`` takes."""
        return self.share_percent / 100


class PopularSettings(Group):
    """The popular lists per segment: the last fallback, and the anonymous segment endpoint."""

    refresh_s: Positive = 60.0
    """How often popular lists are re-read from Redis."""
    segment_max_age_s: NotNegative = 60
    """Cache-Control max-age of the anonymous segment lists."""


class LimitsSettings(Group):
    """What one process takes in at once, and from whom."""

    max_in_flight: AtLeastOne = 256
    """Requests inside the service at once; beyond it: 503 + Retry-After."""
    max_body_bytes: AtLeastOne = 4096
    """Largest request body accepted (413 beyond it)."""
    body_timeout_s: Positive = 5.0
    """Time a request's whole body may take to arrive once its headers are in (408 beyond it); the body is
    read before the request takes an admission slot, so a stalled body never holds one."""
    max_header_bytes: AtLeastOne = 16384
    """Largest request line plus headers (431 beyond it, and the connection is closed)."""
    max_headers: AtLeastOne = 64
    """Most header lines in one request (431 beyond it)."""
    header_timeout_s: Positive = 5.0
    """Time from a connection's first byte (or its opening) to the end of a request's headers: a client
    that sends headers byte by byte, or opens a connection and says nothing, is closed after it."""
    keep_alive_s: Positive = 5.0
    """An idle keep-alive connection (between requests) is closed after this long."""
    max_connections: AtLeastOne = 2048
    """Open connections per server process; one more is answered 503 and closed at once."""
    shedding_window_s: Positive = 2.0
    """/readyz says 503 `shedding` when for this long every request was refused (admission full) and none
    taken: the load balancer then sends elsewhere until this replica catches up."""
    trusted_proxies: str = ""
    """Comma-separated CIDRs of the proxies (ingress, load balancer) whose X-Forwarded-For is believed; from
    any other peer the header is ignored and the peer's own address is the client's. Unset: never believed."""

    @model_validator(mode="after")
    def _proxies(self) -> LimitsSettings:
        for cidr in self.proxy_networks_text:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies must be CIDRs like 10.0.0.0/8, but found {cidr!r}") from None
        return self

    @property
    def proxy_networks_text(self) -> list[str]:
        return [cidr.strip() for cidr in self.trusted_proxies.split(",") if cidr.strip()]


class EventsSettings(Group):
    """Who may write events (POST /v1/events), how fast, and how long what an event writes lives."""

    api_keys: SecretStr | None = None
    """Named API keys, `name:key,name2:key2` (one per calling service; a key is at least 16 characters).
    A write needs one of them in X-API-Key (401 otherwise); each name has its own rate-limit bucket."""
    api_keys_file: Path | None = None
    """More named keys, read at start: a file of `name:key` lines, or a folder holding one file per key,
    named after it (a mounted Kubernetes Secret)."""
    anonymous_writes: bool = False
    """true: a write without X-API-Key is taken (a wrong key is still 401), rate-limited per client address.
    Off by default: writes need a key."""
    rate_per_s: Positive = 50.0
    """Sustained events per second per caller (the key's name), shared by all replicas (429 beyond it)."""
    burst: AtLeastOne = 100
    """Events a caller may send in a burst above the sustained rate."""
    event_id_ttl_s: AtLeastOne = 86_400
    """How long a client-supplied event_id is remembered: a retry within it is answered, not stored twice."""
    user_state_ttl_s: AtLeastOne = 30 * 86_400
    """Lifetime of the per-user keys an event writes (purchased items, cache generation), renewed by each
    event: no key an event creates lives for ever."""

    @model_validator(mode="after")
    def _keys(self) -> EventsSettings:
        if self.api_keys is not None:
            parse_api_keys(self.api_keys.get_secret_value(), "api_keys")  # raises with the rule it broke
        return self


class ReadsSettings(Group):
    """Who may read recommendations, and how fast."""

    require_key: bool = False
    """true: reads need an X-API-Key too (401 otherwise). Off by default: reads come from the product's
    backends, inside the network."""
    rate_per_s: ZeroTurnsOff = 0.0
    """Sustained reads per second per caller (the key's name; without a key, the client address); 0 turns
    the read limit off (no Redis round trip on a read)."""
    burst: AtLeastOne = 200
    """Reads a caller may send in a burst above the sustained rate."""


class TelemetrySettings(Group):
    """What the service tells about each request: its log lines and, when an OTLP endpoint is set, its traces."""

    log_format: Literal["json", "text"] = "json"
    """`json`: one JSON object per line (ts, level, logger, msg, request_id, and the record's fields), for a
    log pipeline to index; `text`: plain lines for a terminal."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Level of the service's own loggers (`orchestrator.*`)."""
    access_log: bool = False
    """true: one `info` line per request (method, route, status, duration, request id). Off by default: at
    tens of thousands of requests per second it costs more than the request; the request id is still
    returned in `X-Request-Id` and carried by every line a request logs."""
    otlp_endpoint: str | None = None
    """OpenTelemetry collector (OTLP over gRPC, e.g. `http://otel-collector:4317`): set, the service traces
    requests (spans for the cache lookup, Redis reads, FAISS search and ranking) and needs the `telemetry`
    extra installed. Unset (the default): no tracing, and the request path pays nothing for it."""
    sample_one_in: AtLeastOne = 1
    """Trace one request in this many (1: every one), by trace id; a caller that sends a W3C `traceparent` has
    decided already, and its decision is followed."""
    service_name: str = "recserve-orchestrator"
    """`service.name` of the spans."""


API_KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
API_KEY_MIN_LENGTH = 16


def parse_api_keys(text: str, source: str) -> dict[str, str]:
    """``name:key`` entries, separated by commas or line breaks, as {name: key}. A message names the entry
    by its position and never shows a key."""
    keys: dict[str, str] = {}
    entries = [entry.strip() for entry in re.split(r"[,\n]", text)]
    for number, entry in enumerate((e for e in entries if e), start=1):
        name, sep, key = entry.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not API_KEY_NAME.fullmatch(name):
            raise ValueError(f"{source}: entry {number} must be name:key, name of [A-Za-z0-9_.-]{{1,64}}")
        if len(key) < API_KEY_MIN_LENGTH or any(c.isspace() for c in key):
            raise ValueError(
                f"{source}: the key of {name!r} must be at least {API_KEY_MIN_LENGTH} characters without spaces"
            )
        if name in keys:
            raise ValueError(f"{source}: the name {name!r} is given twice; one key per name")
        keys[name] = key
    return keys


def read_api_keys_file(path: Path) -> dict[str, str]:
    """The keys of ``events.api_keys_file``: a folder (one file per key, as Kubernetes mounts a Secret; its
    hidden ``..data`` entries skipped) or one file of ``name:key`` lines."""
    if path.is_dir():
        entries = [
            f"{entry.name}:{entry.read_text().strip()}"
            for entry in sorted(path.iterdir())
            if not entry.name.startswith(".") and entry.is_file()
        ]
        return parse_api_keys("\n".join(entries), str(path))
    return parse_api_keys(path.read_text(), str(path))


class VersionsSettings(Group):
    """How a replica follows the active model version (docs/RELEASES.md)."""

    poll_s: Positive = 2.0
    """Besides the notice on the version channel, the active-version pointer is read this often; a switch is
    taken within this (plus the load of the new index and ranker) even if the notice was lost."""
    claim_ttl_s: Positive = 15.0
    """The versions this replica holds are registered in Redis for this long, renewed every poll: `python -m
    export retire` refuses a version some replica still holds, and a replica that died stops holding after it."""
    drain_s: ZeroTurnsOff = 10.0
    """After a switch, the replaced version's index and ranker are closed this much later (requests that took
    it at their start finish on it)."""
    behind_max_s: Positive = 30.0
    """`/readyz` says `version` is degraded when this replica has served another version than the pointer's
    for longer than this (a new version it cannot load)."""


class Settings(BaseSettings):
    """The orchestrator's production settings, one group per concern."""

    # RECSERVE_CACHE_LOCAL_TTL_S -> cache.local_ttl_s: the first word after the prefix names the group.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",  # RECSERVE_DATASET and the ablations share the prefix; they are not settings
        use_attribute_docstrings=True,
        hide_input_in_errors=True,
    )

    redis: RedisSettings = Field(default_factory=RedisSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    onnx: OnnxSettings = Field(default_factory=OnnxSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    ranking: RankingSettings = Field(default_factory=RankingSettings)
    deadline: DeadlineSettings = Field(default_factory=DeadlineSettings)
    warmup: WarmupSettings = Field(default_factory=WarmupSettings)
    overload: OverloadSettings = Field(default_factory=OverloadSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)
    popular: PopularSettings = Field(default_factory=PopularSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    reads: ReadsSettings = Field(default_factory=ReadsSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    versions: VersionsSettings = Field(default_factory=VersionsSettings)

    def api_keys(self) -> dict[str, str]:
        """Every named key ({name: key}): ``events.api_keys`` and the file's; reads the file (call at start)."""
        keys = (
            parse_api_keys(self.events.api_keys.get_secret_value(), "RECSERVE_EVENTS_API_KEYS")
            if self.events.api_keys
            else {}
        )
        if self.events.api_keys_file is not None:
            for name, key in read_api_keys_file(self.events.api_keys_file).items():
                if name in keys:
                    raise ValueError(
                        f"the API key name {name!r} is in RECSERVE_EVENTS_API_KEYS and in the file; one key per name"
                    )
                keys[name] = key
        return keys

    @model_validator(mode="after")
    def _user_state_outlives_the_cache(self) -> Settings:
        # A generation counter must outlive every list stamped with it (orchestrator/cache.py).
        if self.events.user_state_ttl_s <= self.cache.redis_ttl_s:
            raise ValueError(
                f"events.user_state_ttl_s ({self.events.user_state_ttl_s}) must be > cache.redis_ttl_s "
                f"({self.cache.redis_ttl_s})"
            )
        return self


class Ablations(BaseSettings):
    """Switches the benchmarks flip to measure what one piece of the design is worth (docs/LOADTEST.md).
    Production leaves them all at their defaults; the composition root reads them."""

    model_config = SettingsConfigDict(env_prefix=ABLATION_ENV_PREFIX, extra="ignore", use_attribute_docstrings=True)

    cache_enabled: bool = True
    """false: no cache at all; every request computes."""
    local_cache_enabled: bool = True
    """false: drops the in-process cache layer (every cache read goes to Redis)."""
    single_flight_enabled: bool = True
    """false: concurrent misses of one user and context all compute."""
    hot_route_enabled: bool = True
    """false: every recommendation GET goes through FastAPI's full request handling."""
    redis_coalesce: bool = True
    """false: every store call is its own round trip per shard, instead of one for all the calls made in the
    same event-loop iteration (orchestrator/store/coalesce.py)."""
    store_reads: str = "pipelined"
    """one_by_one: one Redis GET at a time, the naive design (orchestrator/naive.py); pipelined: one round trip
    per shard."""
    admission_enabled: bool = True
    """false: no limit on real-time computations (only their deadline bounds them), and while the event loop
    runs late every cache miss answers from the fallback (reason overload): the design without admission by
    capacity (orchestrator/admission.py), for the load test to compare."""


# Variables read under an older, flat name. Set under the old name, each would otherwise be ignored in
# silence (it belongs to no group), and the service would run on a default nobody chose.
RENAMED = {
    "RECSERVE_DEADLINE_MS": "RECSERVE_DEADLINE_REQUEST_MS",
    "RECSERVE_FALLBACK_RESERVE_MS": "RECSERVE_DEADLINE_FALLBACK_RESERVE_MS",
    "RECSERVE_MIN_COMPUTE_MS": "RECSERVE_DEADLINE_MIN_COMPUTE_MS",
    "RECSERVE_BREAKER_FAILURES": "RECSERVE_TRITON_BREAKER_FAILURES",
    "RECSERVE_BREAKER_RESET_S": "RECSERVE_TRITON_BREAKER_RESET_S",
    "RECSERVE_RETRIEVAL_INLINE_MAX_MS": "RECSERVE_INDEX_INLINE_MAX_MS",
    "RECSERVE_N_CANDIDATES": "RECSERVE_RANKING_N_CANDIDATES",
    "RECSERVE_MAX_N": "RECSERVE_RANKING_LIST_LENGTH",
    "RECSERVE_LOCAL_CACHE_SIZE": "RECSERVE_CACHE_LOCAL_SIZE",
    "RECSERVE_LOCAL_CACHE_TTL_S": "RECSERVE_CACHE_LOCAL_TTL_S",
    "RECSERVE_REDIS_CACHE_TTL_S": "RECSERVE_CACHE_REDIS_TTL_S",
    "RECSERVE_INVALIDATION_MAX_SILENCE_S": "RECSERVE_CACHE_INVALIDATION_MAX_SILENCE_S",
    "RECSERVE_SEGMENT_MAX_AGE_S": "RECSERVE_POPULAR_SEGMENT_MAX_AGE_S",
    "RECSERVE_MAX_IN_FLIGHT": "RECSERVE_LIMITS_MAX_IN_FLIGHT",
    "RECSERVE_MAX_BODY_BYTES": "RECSERVE_LIMITS_MAX_BODY_BYTES",
    "RECSERVE_API_KEY": "RECSERVE_EVENTS_API_KEYS",
    "RECSERVE_EVENTS_API_KEY": "RECSERVE_EVENTS_API_KEYS",
    "RECSERVE_CACHE_ENABLED": "RECSERVE_ABLATION_CACHE_ENABLED",
    "RECSERVE_LOCAL_CACHE_ENABLED": "RECSERVE_ABLATION_LOCAL_CACHE_ENABLED",
    "RECSERVE_SINGLE_FLIGHT_ENABLED": "RECSERVE_ABLATION_SINGLE_FLIGHT_ENABLED",
    "RECSERVE_HOT_ROUTE_ENABLED": "RECSERVE_ABLATION_HOT_ROUTE_ENABLED",
    "RECSERVE_REDIS_COALESCE": "RECSERVE_ABLATION_REDIS_COALESCE",
    "RECSERVE_STORE_READS": "RECSERVE_ABLATION_STORE_READS",
}


def check_renamed(environ: Mapping[str, str]) -> None:
    """Stop the start when a variable is set under a name the service no longer reads."""
    for old, new in RENAMED.items():
        if old in environ:
            raise RenamedSetting(old, new)


# -- the documentation, printed from the classes above --------------------------------------------------


def environment_variables(settings_class: type[BaseSettings] = Settings) -> Iterator[tuple[str, FieldInfo]]:
    """Every variable a settings class reads, with its field, in declaration order: RECSERVE_<GROUP>_<FIELD>
    for a class of groups (``Settings``), <prefix><FIELD> for a flat one (``Ablations``)."""
    prefix = settings_class.model_config.get("env_prefix", "")
    for name, field in settings_class.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, Group):
            for member, member_field in group.model_fields.items():
                yield f"{prefix}{name.upper()}_{member.upper()}", member_field
        else:
            yield f"{prefix}{name.upper()}", field


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, Path):
        value = value.relative_to(REPO_ROOT) if value.is_relative_to(REPO_ROOT) else value
    elif isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`"


def _meaning(field: FieldInfo) -> str:
    return re.sub(r"\s+", " ", field.description or "").strip().replace("|", "\\|")


def markdown_table(settings_class: type[BaseSettings] = Settings) -> str:
    """The configuration table of README.md (``Settings``) or docs/LOADTEST.md (``Ablations``)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [
        f"| `{name}` | {_default(field)} | {_meaning(field)} |" for name, field in environment_variables(settings_class)
    ]
    return "\n".join(rows) + "\n"


BEGIN = "<!-- BEGIN {name} table: generated by `python -m orchestrator.config --update {path}` -->\n"
END = "<!-- END {name} table -->\n"
TABLES: dict[str, tuple[str, type[BaseSettings]]] = {
    "README.md": ("settings", Settings),
    "docs/LOADTEST.md": ("ablations", Ablations),
}


def with_table(text: str, path: str) -> str:
    """``text`` (the file at ``path``, relative to the repository) with its generated table rewritten."""
    name, settings_class = TABLES[path]
    begin, end = BEGIN.format(name=name, path=path), END.format(name=name)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{path} must hold the lines {begin.strip()!r} and {end.strip()!r}, in that order")
    return text[: start + len(begin)] + markdown_table(settings_class) + text[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.config", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the settings table (README.md)")
    action.add_argument("--ablations", action="store_true", help="print the ablations table (docs/LOADTEST.md)")
    action.add_argument("--update", choices=sorted(TABLES), help="rewrite the generated table in this file")
    args = parser.parse_args(argv)
    if args.update:
        target = REPO_ROOT / args.update
        target.write_text(with_table(target.read_text(), args.update))
    else:
        sys.stdout.write(markdown_table(Ablations if args.ablations else Settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
