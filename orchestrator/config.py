"""Service settings: typed, with units in the names, read from ``RECSERVE_*`` environment variables and
validated at start (a bad value stops the service with the rule it broke)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.store.backend import ConnectionOptions

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSERVE_", extra="ignore")

    redis_urls: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Comma-separated Redis URLs. Standalone mode: one or more shards on a hash ring. "
        "Cluster mode: any one node of the Redis Cluster.",
    )
    redis_mode: Literal["sharded", "cluster"] = Field("sharded", description="Topology of redis_urls.")
    redis_timeout_ms: float = Field(25.0, description="Per-shard deadline of one batch read.")
    redis_username: str | None = Field(
        None, description="Redis ACL user (unset: the URL's user, else 'default'). A user in the URL wins."
    )
    redis_password: SecretStr | None = Field(
        None, description="Password of the Redis ACL user (from a Secret); never logged. A password in the URL wins."
    )
    redis_tls_ca_file: Path | None = Field(
        None, description="CA bundle that signed the Redis servers' certificates; used with rediss:// URLs."
    )
    redis_max_connections: int = Field(
        64, description="Connections per Redis shard/node per process; a burst beyond it waits for a free one."
    )
    redis_pool_timeout_ms: float = Field(
        1000.0,
        description="How long a command waits for a free pooled connection before the shard counts as "
        "unavailable (on the request path the per-shard deadline usually ends the wait first).",
    )
    triton_url: str | None = Field(
        None,
        description="Triton gRPC address (host:port, or dns:///name:port for client-side round robin over a "
        "headless Service). Unset: rank in process with ONNX Runtime.",
    )
    triton_model: str = Field("ranker_onnx", description="Triton model that ranks.")
    triton_max_connection_age_s: float = Field(
        300.0, description="Reconnect (and re-resolve DNS) this often, so new Triton pods get traffic."
    )
    onnx_model_path: Path = Field(
        REPO_ROOT / "model_repository" / "ranker_onnx" / "1" / "model.onnx",
        description="Ranker for the in-process backend (used when triton_url is unset).",
    )
    index_path: Path = Field(
        REPO_ROOT / "build" / "artifacts" / "synthetic" / "item_index.faiss",
        description="FAISS item index; its manifest sits beside it (.json).",
    )
    deadline_ms: float = Field(100.0, description="End-to-end budget of one recommendation request.")
    fallback_reserve_ms: float = Field(
        20.0, description="Part of the deadline kept for the fallback path (pre-computed, then popular)."
    )
    min_compute_ms: float = Field(
        20.0,
        description="Compute in real time only if this much of the budget is left after the cache lookup; "
        "else answer from the fallback at once (sheds work when the process is saturated).",
    )
    overload_loop_lag_ms: float = Field(
        5.0,
        description="While the event loop runs this late (moving average), a cache miss answers from the "
        "fallback instead of computing (orchestrator/loop_lag.py); 0 turns it off.",
    )
    overload_hold_s: float = Field(
        2.0,
        description="A fallback answered because this process was overloaded (overload, deadline) is kept in the "
        "local cache this long, so that the user's next requests do not compute under the same overload; an "
        "event evicts it like any list. 0 turns it off.",
    )
    retrieval_inline_max_ms: float = Field(
        1.0,
        description="FAISS searches measured at start to take at most this long run on the event loop (a thread "
        "hop costs more than a short search); longer ones run in a thread; 0: always a thread.",
    )
    n_candidates: int = Field(200, description="Candidates retrieved from FAISS and ranked per request.")
    max_n: int = Field(100, description="Longest list a client may ask for; the cached list has this length.")
    local_cache_size: int = Field(100_000, description="Entries in the in-process LRU cache.")
    local_cache_ttl_s: float = Field(
        30.0,
        description="Lifetime of a local cache entry: bounds what events do not invalidate (a new model version).",
    )
    invalidation_max_silence_s: float = Field(
        1.0,
        description="Hard bound on cross-replica staleness after an event: the local layer answers only while "
        "the invalidation channel has proven itself alive this recently (else the Redis layer answers).",
    )
    redis_cache_ttl_s: int = Field(300, description="Lifetime of a shared (Redis) cache entry.")
    segment_max_age_s: int = Field(60, description="Cache-Control max-age of the anonymous segment lists.")
    popular_refresh_s: float = Field(60.0, description="How often popular lists are re-read from Redis.")
    breaker_failures: int = Field(5, description="Consecutive ranker failures that open the circuit.")
    breaker_reset_s: float = Field(2.0, description="How long an open circuit waits before probing again.")
    warmup_timeout_s: float = Field(
        5.0,
        description="At start, before serving, one pass over the compute path with a zero user vector (retrieval, "
        "the candidates' Redis reads, one Triton ranking) may take this long; 0 skips it.",
    )
    max_in_flight: int = Field(256, description="Requests inside the service at once; beyond it: 503 + Retry-After.")
    max_body_bytes: int = Field(4096, description="Largest request body accepted (413 beyond it).")
    api_key: SecretStr | None = Field(None, description="If set, writes (POST /v1/events) need this X-API-Key.")
    events_rate_per_s: float = Field(50.0, description="Sustained events per second per client (429 beyond it).")
    events_burst: int = Field(100, description="Events a client may send in a burst above the sustained rate.")
    # Switches for ablation benchmarks (loadtest/): each turns one piece of the design off.
    cache_enabled: bool = Field(True, description="Ablation: false computes every request (no cache at all).")
    local_cache_enabled: bool = Field(True, description="Ablation: false drops the in-process cache layer.")
    single_flight_enabled: bool = Field(True, description="Ablation: false lets concurrent misses all compute.")
    hot_route_enabled: bool = Field(
        True, description="Ablation: false routes every recommendation GET through FastAPI's full request handling."
    )
    redis_coalesce: bool = Field(
        True,
        description="Store calls made in the same event-loop iteration go to Redis as one round trip per shard "
        "(orchestrator/store/coalesce.py); false: one round trip per call.",
    )
    store_reads: Literal["pipelined", "one_by_one"] = Field(
        "pipelined", description="Ablation: one_by_one issues one Redis GET at a time (the naive design)."
    )

    @field_validator(
        "redis_timeout_ms",
        "redis_pool_timeout_ms",
        "deadline_ms",
        "local_cache_ttl_s",
        "invalidation_max_silence_s",
        "triton_max_connection_age_s",
        "breaker_reset_s",
        "events_rate_per_s",
    )
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be > 0, got {value}")
        return value

    @field_validator(
        "n_candidates",
        "max_n",
        "local_cache_size",
        "redis_cache_ttl_s",
        "breaker_failures",
        "max_in_flight",
        "redis_max_connections",
        "max_body_bytes",
        "events_burst",
    )
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be an integer >= 1, got {value}")
        return value

    @field_validator("warmup_timeout_s", "overload_loop_lag_ms", "overload_hold_s", "retrieval_inline_max_ms")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if not value >= 0:  # NaN too
            raise ValueError(f"must be >= 0 (0 turns it off), got {value}")
        return value

    @model_validator(mode="after")
    def _budget(self) -> Settings:
        if not 0 <= self.fallback_reserve_ms < self.deadline_ms:
            raise ValueError(
                f"fallback_reserve_ms must be in 0..deadline_ms ({self.deadline_ms}), got {self.fallback_reserve_ms}"
            )
        if not 0 <= self.min_compute_ms <= self.deadline_ms - self.fallback_reserve_ms:
            raise ValueError(
                f"min_compute_ms must be in 0..deadline_ms - fallback_reserve_ms "
                f"({self.deadline_ms - self.fallback_reserve_ms}), got {self.min_compute_ms}"
            )
        if self.max_n > self.n_candidates:
            raise ValueError(f"max_n ({self.max_n}) must be <= n_candidates ({self.n_candidates})")
        if not self.redis_url_list:
            raise ValueError("redis_urls must name at least one Redis URL")
        if self.redis_tls_ca_file is not None and not self.redis_tls_ca_file.is_file():
            raise ValueError(f"redis_tls_ca_file must be a readable file, got {str(self.redis_tls_ca_file)!r}")
        return self

    @property
    def redis_connection(self) -> ConnectionOptions:
        """How every Redis client of this process connects (credentials, TLS, bounded pools)."""
        return ConnectionOptions(
            username=self.redis_username,
            password=self.redis_password.get_secret_value() if self.redis_password else None,
            ca_file=self.redis_tls_ca_file,
            max_connections=self.redis_max_connections,
            pool_timeout_s=self.redis_pool_timeout_ms / 1000,
            connect_timeout_s=max(self.redis_timeout_ms / 1000, 0.5),
        )

    @property
    def redis_url_list(self) -> list[str]:
        return [url.strip() for url in self.redis_urls.split(",") if url.strip()]
