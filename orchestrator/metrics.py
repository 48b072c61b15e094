"""Prometheus metrics. Names are part of the contract with the Grafana dashboard in k8s/."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Buckets around the 100 ms SLO: fine below it, coarse above.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)

REQUEST_LATENCY = Histogram(
    "recserve_request_latency_seconds", "End-to-end request latency.", ["endpoint", "source"], buckets=LATENCY_BUCKETS_S
)
STAGE_LATENCY = Histogram(
    "recserve_stage_latency_seconds", "Latency of one stage of the request flow.", ["stage"], buckets=LATENCY_BUCKETS_S
)
# Layers local and redis count requests; item_embeddings and item_features (orchestrator/store/item_rows.py) rows.
CACHE_HITS = Counter("recserve_cache_hits_total", "Cache hits per layer.", ["layer"])
CACHE_MISSES = Counter("recserve_cache_misses_total", "Cache misses per layer.", ["layer"])
FALLBACKS = Counter("recserve_fallbacks_total", "Answers not computed in real time, by reason.", ["reason"])
RANKER_ERRORS = Counter("recserve_ranker_errors_total", "Ranker calls that failed or timed out.")
SINGLE_FLIGHT_JOINS = Counter("recserve_single_flight_joins_total", "Requests that joined an in-flight computation.")
MISSING_FEATURES = Counter(
    "recserve_missing_features_total", "Rows whose features or embeddings were missing and defaulted.", ["kind"]
)
EVENTS = Counter("recserve_events_total", "Accepted events by type.", ["type"])
INVALIDATIONS = Counter("recserve_invalidations_total", "Local cache evictions by cause.", ["cause"])
LOOP_LAG = Histogram(
    "recserve_event_loop_lag_seconds",
    "How late the event loop ran a timer (sampled every 5 ms): the backlog every await waits behind.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25),
)
REDIS_CALLS_PER_BATCH = Histogram(
    "recserve_redis_calls_per_batch",
    "Store calls sent to Redis together (orchestrator/store/coalesce.py): one round trip per shard per batch.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)
GC_PAUSE = Histogram(
    "recserve_gc_pause_seconds",
    "Garbage-collection pauses of the serving process, by generation (2: full collection).",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
)
SHED = Counter("recserve_shed_total", "Requests refused with 503 because too many were in flight.")
REJECTED_WRITES = Counter("recserve_rejected_writes_total", "Write requests refused, by reason.", ["reason"])
RATE_LIMIT_FALLBACKS = Counter(
    "recserve_rate_limit_fallbacks_total",
    "Rate-limit checks answered by this replica's own bucket because Redis did not answer (fail open).",
)
DUPLICATE_EVENTS = Counter(
    "recserve_duplicate_events_total", "Events whose client-supplied event_id was already stored (not stored again)."
)
COMPUTE_LIMIT = Gauge(
    "recserve_compute_limit",
    "Real-time computations admitted at once now (orchestrator/admission.py); +Inf: no limit (the ablation).",
)
COMPUTE_IN_FLIGHT = Gauge("recserve_compute_in_flight", "Real-time computations running now.")
VERSION_SWITCHES = Counter(
    "recserve_version_switches_total", "Model versions this replica switched to without a restart (the pointer moved)."
)
VERSION_ANSWERS = Counter(
    "recserve_version_answers_total",
    "Recommendation answers by the model version that served them and their source (realtime, cache, precomputed, "
    "session, popular): compares a new version with the active one.",
    ["version", "source"],
)
EDGE_REFUSED = Counter(
    "recserve_edge_refused_total",
    "Connections or requests refused by the HTTP layer's limits (orchestrator/edge.py, guards.py), by reason.",
    ["reason"],
)
METRICS_RENDERS = Counter(
    "recserve_metrics_renders_total", "Times /metrics was rendered; scrapes in between get the cached bytes."
)
VERSION_LATENCY = Histogram(
    "recserve_version_latency_seconds",
    "Recommendation latency in the recommender by the model version that served it (a canary against the active one).",
    ["version"],
    buckets=LATENCY_BUCKETS_S,
)
# The ranker's output is a sigmoid (export/models.py): 0..1, finer near the top where good lists sit.
TOP_SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
VERSION_TOP_SCORE = Histogram(
    "recserve_version_top_score",
    "The ranker's score of the first item of each ranked answer (realtime, cache, precomputed), by the model "
    "version that served it: a canary whose scores shift shows before its clicks do.",
    ["version"],
    buckets=TOP_SCORE_BUCKETS,
)
ATTRIBUTED_EVENTS = Counter(
    "recserve_attributed_events_total",
    "Accepted events that quote the request id of the answer they follow, by the model version and arm that "
    "serve the event's user and the event type: events per answer of a canary against the active version.",
    ["version", "arm", "type"],
)
