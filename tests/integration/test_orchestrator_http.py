"""The orchestrator over real HTTP, on a real Redis and a real Triton (both started by the fixtures)."""

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from export.model_repository import render_profile_repository
from export.precompute import Candidates, PrecomputeConfig, offline_top_n
from export.triton_config import ranker_models
from orchestrator.cache import invalidation_message
from orchestrator.ranking.onnx_ranker import OnnxRanker
from orchestrator.retrieval import FaissRetriever
from orchestrator.store import keys
from stack.triton_launcher import TritonServer
from tests.conftest import API_HEADERS, Stack, running_orchestrator
from tests.waiting import poll

pytestmark = pytest.mark.integration


def get(url: str, **params: str | int) -> dict:
    response = httpx.get(url, params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def recs(base: str, user: str, **params: str | int) -> dict:
    return get(f"{base}/v1/recommendations/{user}", **params)


def invalidations_heard(base: str) -> float:
    """How many published invalidations this orchestrator has applied to its local layer (/metrics)."""
    wanted = 'recserve_invalidations_total{cause="pubsub"} '
    lines = httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(wanted)), 0.0)


def forget(stack: Stack, user: str, replica: str) -> None:
    """Invalidate the user's cached lists as an event would (other tests, the load-test smoke run and the
    fuzzer among them, share this Redis and these orchestrators): the generation bump and the published
    message evict the lists from every orchestrator's local layer too, not only from Redis. Returns once
    ``replica`` (the orchestrator the test asks next) has applied the message."""
    import redis

    heard = invalidations_heard(replica)
    client = redis.Redis.from_url(stack.redis.url)
    generation = client.incr(keys.generation(user))
    client.delete(keys.rec_cache(user))
    client.publish(keys.INVALIDATION_CHANNEL, invalidation_message(user, int(generation)))
    client.close()
    # The message reaches each orchestrator on its own connection.
    poll(lambda: invalidations_heard(replica) > heard, 5, f"{replica} applied the invalidation of {user}")


def test_known_user_gets_realtime_then_cache(app_url: str, stack: Stack) -> None:
    forget(stack, "11", app_url)
    first = recs(app_url, "11", n=10)
    second = recs(app_url, "11", n=10)
    assert first["source"] == "realtime" and second["source"] == "cache"
    assert first["items"] == second["items"] and len(first["items"]) == 10
    assert first["model_version"] == second["model_version"]


def test_served_top_n_equals_the_offline_top_n(app_url: str, stack: Stack) -> None:
    bundle = stack.exported.bundle
    retriever = FaissRetriever(bundle.path / "item_index.faiss")
    candidates = Candidates(bundle, retriever, PrecomputeConfig())
    score = OnnxRanker(stack.onnx_path, bundle.model_version).run
    for user in ("3", "17", "42"):
        # The offline top-N knows no session: clear any the load test's events left (they move the answer).
        import redis

        client = redis.Redis.from_url(stack.redis.url)
        dropped = client.delete(keys.session(user))
        client.close()
        if dropped:
            forget(stack, user, app_url)
        served = recs(app_url, user, n=20, page_type="home", device="web")
        offline_items, offline_scores = offline_top_n(candidates, bundle.user_ids.index(user), score)
        assert [i["item_id"] for i in served["items"]] == offline_items[:20]
        np.testing.assert_allclose([i["score"] for i in served["items"]], offline_scores[:20], atol=1e-5)


def test_unknown_user_gets_popular(app_url: str, stack: Stack) -> None:
    body = recs(app_url, "not-a-user", n=5)
    assert body["source"] == "popular"
    assert [i["item_id"] for i in body["items"]] == stack.exported.bundle.popular["global"][:5]


def test_purchase_is_excluded_from_the_next_answer(app_url: str) -> None:
    before = recs(app_url, "23", n=10)
    bought = before["items"][0]["item_id"]
    response = httpx.post(
        f"{app_url}/v1/events",
        json={"user_id": "23", "item_id": bought, "type": "purchase"},
        headers=API_HEADERS,
        timeout=10,
    )
    assert response.status_code == 202 and response.json()["status"] == "accepted"
    after = recs(app_url, "23", n=10)
    assert after["source"] == "realtime"  # invalidated, so recomputed
    assert bought not in [i["item_id"] for i in after["items"]]


def test_an_event_on_one_replica_invalidates_the_other_within_a_second(app_url: str, second_app_url: str) -> None:
    user = "31"
    cached = recs(second_app_url, user, n=10)
    assert recs(second_app_url, user, n=10)["source"] == "cache"
    bought = cached["items"][0]["item_id"]
    httpx.post(
        f"{app_url}/v1/events",
        json={"user_id": user, "item_id": bought, "type": "purchase"},
        headers=API_HEADERS,
        timeout=10,
    )
    started = time.monotonic()
    while True:  # poll the other replica until it stops serving the old list
        items = [i["item_id"] for i in recs(second_app_url, user, n=10)["items"]]
        if bought not in items:
            break
        assert time.monotonic() - started < 1.0, "replica B served the pre-purchase list for over 1 s"
    assert time.monotonic() - started < 1.0


def test_segment_lists_are_cdn_cacheable(app_url: str) -> None:
    url = f"{app_url}/v1/segments/global/recommendations"
    first = httpx.get(url, params={"n": 5}, timeout=10)
    assert first.status_code == 200 and first.json()["source"] == "popular"
    assert first.headers["cache-control"].startswith("public, max-age=")
    etag = first.headers["etag"]
    again = httpx.get(url, params={"n": 5}, headers={"If-None-Match": etag}, timeout=10)
    assert again.status_code == 304 and again.headers["etag"] == etag
    missing = httpx.get(f"{app_url}/v1/segments/teenagers/recommendations", timeout=10)
    assert missing.status_code == 404 and "unknown segment 'teenagers'" in missing.json()["detail"]


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/recommendations/7", {"n": 0}, "n"),
        ("/v1/recommendations/7", {"n": 101}, "n"),
        ("/v1/recommendations/7", {"page_type": "moon"}, "page_type"),
        ("/v1/recommendations/7", {"device": "fridge"}, "device"),
        ("/v1/recommendations/", {}, "user_id"),
        ("/v1/recommendations/" + "x" * 65, {}, "user_id"),
        ("/v1/recommendations/a%20b", {}, "user_id"),
        ("/v1/recommendations/%7Bu%3A1%7D", {}, "user_id"),
    ],
)
def test_bad_query_input_is_a_422_naming_the_field(app_url: str, path: str, params: dict, field: str) -> None:
    response = httpx.get(app_url + path, params=params, timeout=10)
    assert response.status_code == 422, response.text
    assert field in [str(part) for part in response.json()["detail"][0]["loc"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "1", "item_id": "2", "type": "buy"}, "type"),
        ({"user_id": "", "item_id": "2", "type": "view"}, "user_id"),
        ({"user_id": "1", "type": "view"}, "item_id"),
        ({"user_id": "1", "item_id": "2", "type": "view", "extra": 1}, "extra"),
        ({"user_id": "1", "item_id": "2", "type": "click", "request_id": "a b"}, "request_id"),
    ],
)
def test_bad_events_are_a_422_naming_the_field(app_url: str, body: dict, field: str) -> None:
    response = httpx.post(f"{app_url}/v1/events", json=body, headers=API_HEADERS, timeout=10)
    assert response.status_code == 422
    assert field in [str(part) for part in response.json()["detail"][0]["loc"]]


def attributed(base: str, version: str, arm: str, event_type: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"version": version, "arm": arm, "type": event_type}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        if family.name == "recserve_attributed_events":
            return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels == wanted)
    return 0.0


def test_a_click_quoting_an_answers_request_id_is_stored_with_it_and_counted_for_its_version(
    app_url: str, stack: Stack
) -> None:
    import redis

    answer = httpx.get(f"{app_url}/v1/recommendations/52", params={"n": 5, "debug": "true"}, timeout=10)
    assert answer.status_code == 200
    request_id, body = answer.headers["x-request-id"], answer.json()
    version, arm = body["model_version"], body["arm"]
    before = attributed(app_url, version, arm, "click")
    clicked = body["items"][0]["item_id"]
    event = {"user_id": "52", "item_id": clicked, "type": "click"}
    # First an event that quotes no answer: stored, and counted for no version.
    plain = httpx.post(f"{app_url}/v1/events", json=event, headers=API_HEADERS, timeout=10)
    assert plain.status_code == 202, plain.text
    response = httpx.post(
        f"{app_url}/v1/events", json=event | {"request_id": request_id}, headers=API_HEADERS, timeout=10
    )
    assert response.status_code == 202, response.text
    # /metrics is rendered at most once a second: wait for a render after the second event. One that shows it
    # shows the first too, had that one been counted.
    poll(lambda: attributed(app_url, version, arm, "click") > before, 5, "the quoting click counted")
    assert attributed(app_url, version, arm, "click") == before + 1
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    entry = response.json()["id"]
    found: Any = client.xrange(keys.EVENTS_STREAM, min=entry, max=entry)
    stored = dict(found[0][1])
    client.close()
    assert (stored["user_id"], stored["item_id"], stored["request_id"]) == ("52", clicked, request_id)


def test_malformed_json_is_a_422(app_url: str) -> None:
    response = httpx.post(
        f"{app_url}/v1/events",
        content=b'{"user_id": ',
        headers={"content-type": "application/json"} | API_HEADERS,
        timeout=10,
    )
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"


def test_debug_adds_per_stage_timings(app_url: str, stack: Stack) -> None:
    forget(stack, "44", app_url)
    body = recs(app_url, "44", n=5, debug="true")
    assert body["source"] == "realtime"
    assert {"cache", "user_features", "retrieval", "item_features", "ranking", "total"} <= set(body["timings_ms"])


def test_metrics_are_exported(app_url: str) -> None:
    recs(app_url, "45", n=5)
    text = httpx.get(f"{app_url}/metrics", timeout=10).text
    for name in (
        "recserve_request_latency_seconds_bucket",
        "recserve_stage_latency_seconds_bucket",
        "recserve_cache_misses_total",
        "recserve_compute_limit",
        "recserve_compute_in_flight",
    ):
        assert name in text


def test_with_triton_stopped_answers_are_precomputed_and_readyz_says_degraded(stack: Stack, tmp_path: Path) -> None:
    models = ranker_models(stack.exported.bundle.dim, stack.exported.batching)
    repo = render_profile_repository("cpu", tmp_path / "cpu", stack.exported.repo, models=models)
    triton = TritonServer(repo, log_path=tmp_path / "triton.log").start()
    # No cache: other tests share this Redis, and this one is about ranking and its fallback.
    env = stack.env(
        triton.grpc_url,
        RECSERVE_DEADLINE_REQUEST_MS="300",
        RECSERVE_DEADLINE_FALLBACK_RESERVE_MS="100",
        RECSERVE_ABLATION_CACHE_ENABLED="false",
    )
    try:
        with running_orchestrator(env, tmp_path / "app.log") as app:
            assert recs(app.url, "51", n=5)["source"] == "realtime"
            assert get(f"{app.url}/readyz")["components"]["ranker"] == "ok (triton)"
            triton.kill()
            started = time.perf_counter()
            body = recs(app.url, "52", n=5)
            elapsed_ms = (time.perf_counter() - started) * 1000
            assert body["source"] == "precomputed" and len(body["items"]) == 5
            assert elapsed_ms < 300 + 150  # the deadline, plus HTTP and scheduling slack on a busy machine
            ready = httpx.get(f"{app.url}/readyz", timeout=10)
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded" and "ranker" in ready.json()["degraded"]
    finally:
        triton.stop()


def test_a_fresh_process_ranks_once_on_triton_before_it_reports_ready(stack: Stack, tmp_path: Path) -> None:
    import tritonclient.http as httpclient

    models = ranker_models(stack.exported.bundle.dim, stack.exported.batching)
    repo = render_profile_repository("cpu", tmp_path / "cpu", stack.exported.repo, models=models)

    def rows_ranked(client: httpclient.InferenceServerClient) -> int:
        stats = client.get_inference_statistics("ranker_onnx")["model_stats"][0]
        return int(stats.get("inference_count", 0))

    with TritonServer(repo, log_path=tmp_path / "triton.log") as triton:
        client = httpclient.InferenceServerClient(triton.http_url)
        before = rows_ranked(client)
        with running_orchestrator(stack.env(triton.grpc_url, RECSERVE_WARMUP_TIMEOUT_S="0"), tmp_path / "cold.log"):
            assert rows_ranked(client) == before  # switched off: nothing ranked before the first request
        with running_orchestrator(stack.env(triton.grpc_url), tmp_path / "warm.log"):
            # Ready (start_orchestrator waited for /readyz) and no request sent: the warm-up ranked a full
            # request's candidates once, so the channel is open and the model has run.
            assert rows_ranked(client) == before + min(200, len(stack.exported.bundle.item_ids))
        client.close()


def test_past_the_admission_limit_a_miss_is_answered_at_once_from_the_precomputed_list(
    stack: Stack, triton: Any, tmp_path: Path
) -> None:
    """One computation at a time (a fixed limit of 1) and no cache: of a burst of misses for different users,
    one computes and the rest are shed to their pre-computed lists, every one a 200."""
    import asyncio

    env = stack.env(
        triton.grpc_url,
        RECSERVE_ADMISSION_INITIAL_LIMIT="1",
        RECSERVE_ADMISSION_MIN_LIMIT="1",
        RECSERVE_ADMISSION_MAX_LIMIT="1",
        RECSERVE_ABLATION_CACHE_ENABLED="false",  # other tests share this Redis; this one is about computing
    )
    users = stack.exported.bundle.user_ids[:24]

    async def burst(base: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            replies = await asyncio.gather(*(client.get(f"/v1/recommendations/{u}", params={"n": 5}) for u in users))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
        return [r.json() for r in replies]

    with running_orchestrator(env, tmp_path / "app.log") as app:
        answers = asyncio.run(burst(app.url))
        metrics_text = httpx.get(f"{app.url}/metrics", timeout=10).text
    shed = [a for a in answers if a.get("fallback_reason") == "shed"]
    assert shed and all(a["source"] == "precomputed" and len(a["items"]) == 5 for a in shed), answers
    assert any(a["source"] == "realtime" for a in answers), answers
    assert "recserve_compute_limit 1.0" in metrics_text
    assert 'recserve_fallbacks_total{reason="shed"}' in metrics_text
