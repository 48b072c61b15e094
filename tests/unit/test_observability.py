"""Request observability: every answer carries a request id (the caller's when well-formed), every JSON log line
a request causes carries the same id, and tracing (off by default) puts one span per dependency of a miss
under the request's span."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import onnx
import pytest
from onnx import TensorProto, helper
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator import logs, schema, telemetry
from orchestrator.app import create_app
from orchestrator.config import Ablations, Settings, TelemetrySettings
from orchestrator.ranking.onnx_ranker import OnnxRanker
from orchestrator.recommender import Recommendation, RequestContext
from tests.unit.test_recommender_flow import DIM, FakeRanker, make

log = logging.getLogger("orchestrator.tests")


class LoggingRecommender:
    """Logs one line with a field of its own while it answers, as a component on the request path would."""

    async def recommend(self, user_id: str, n: int, context: RequestContext) -> Recommendation:
        log.warning("answering", extra={"user_id": user_id})
        return Recommendation(user_id, [("i1", 1.0)][:n], "cache", "v7", {"cache": 0.1})


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    yield stream
    for handler in [h for h in logging.getLogger().handlers if isinstance(h, logs._Ours)]:
        logging.getLogger().removeHandler(handler)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def app_with(recommender: Any, hot_route: bool, stream: io.StringIO | None = None) -> Any:
    app = create_app(Settings(telemetry=TelemetrySettings(access_log=True)), Ablations(hot_route_enabled=hot_route))
    if stream is not None:
        logs.configure("json", "info", stream)  # create_app configured stderr: the test reads its own stream
    app.state.services = SimpleNamespace(recommender=recommender)  # no lifespan: only the recommender is used
    return app


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("hot_route", [True, False], ids=["hot-route", "fastapi-route"])
async def test_log_lines_carry_the_request_id_the_response_returns(hot_route: bool, log_lines: io.StringIO) -> None:
    app = app_with(LoggingRecommender(), hot_route, log_lines)
    async with client(app) as http:
        response = await http.get("/v1/recommendations/u1")
        second = await http.get("/v1/recommendations/u2")
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    assert request_id and request_id != second.headers["x-request-id"], "a new id per request"
    mine = [line for line in lines(log_lines) if line["request_id"] == request_id]
    assert [line["msg"] for line in mine] == ["answering", "request"], lines(log_lines)
    answering, access = mine
    assert {"ts", "level", "logger", "msg", "request_id"} <= set(answering)
    assert answering["level"] == "warning" and answering["logger"] == "orchestrator.tests"
    assert answering["user_id"] == "u1", "the record's own fields are written too"
    assert access["route"] == "/v1/recommendations/{user_id}" and access["status"] == 200
    assert "u1" not in json.dumps(access), "the access line names the route, never the user"


@pytest.mark.parametrize("hot_route", [True, False], ids=["hot-route", "fastapi-route"])
async def test_a_well_formed_caller_id_is_kept_and_anything_else_replaced(hot_route: bool) -> None:
    app = app_with(LoggingRecommender(), hot_route)
    async with client(app) as http:
        kept = await http.get("/v1/recommendations/u1", headers={"X-Request-Id": "gw-7f3a.91:2"})
        odd = [await http.get("/v1/recommendations/u1", headers={"X-Request-Id": v}) for v in ("a b", "x" * 129, "")]
        refused = await http.get("/v1/recommendations/u1?n=0")  # FastAPI's 422, still with an id
    assert kept.headers["x-request-id"] == "gw-7f3a.91:2"
    for response, sent in zip(odd, ("a b", "x" * 129, ""), strict=True):
        assert response.headers["x-request-id"] not in (sent, ""), f"{sent!r} must be replaced, not echoed"
    assert refused.status_code == 422 and refused.headers["x-request-id"]


def onnx_ranker(folder: Path) -> OnnxRanker:
    """A real in-process ranker on a tiny model: the score is the sum of the item embedding."""
    inputs = [
        helper.make_tensor_value_info("user_embedding", TensorProto.FLOAT, [None, DIM]),
        helper.make_tensor_value_info("item_embedding", TensorProto.FLOAT, [None, DIM]),
        helper.make_tensor_value_info("user_features", TensorProto.INT64, [None, len(schema.USER_FEATURES)]),
        helper.make_tensor_value_info("item_features", TensorProto.INT64, [None, len(schema.ITEM_FEATURES)]),
        helper.make_tensor_value_info("context_features", TensorProto.INT64, [None, len(schema.CONTEXT_FEATURES)]),
    ]
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, [None])
    ones = helper.make_tensor("ones", TensorProto.FLOAT, [DIM], [1.0] * DIM)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["item_embedding", "ones"], ["score"])], "sum", inputs, [score], [ones]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), folder / "model.onnx")
    return OnnxRanker(folder / "model.onnx", "v-test")


async def test_tracing_puts_one_span_per_dependency_of_a_miss_under_the_request_span(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    stop = telemetry.start(TelemetrySettings(), exporter=exporter)
    assert stop is not None
    try:
        recommender = await make(cast(Any, onnx_ranker(tmp_path)))
        app = app_with(recommender, hot_route=True)
        async with client(app) as http:
            response = await http.get("/v1/recommendations/1?n=3")
        await recommender.drain()
    finally:
        stop()
    assert response.json()["source"] == "realtime"
    spans = {span.name: span for span in exporter.get_finished_spans()}
    request = spans["GET /v1/recommendations/{user_id}"]
    assert request.parent is None and request.attributes is not None
    assert request.attributes["recserve.request_id"] == response.headers["x-request-id"]
    assert request.attributes["http.response.status_code"] == 200
    stages = ["cache.lookup", "redis.user_features", "faiss.search", "redis.item_features", "rank"]
    assert set(stages) <= set(spans), sorted(spans)
    trace_id = request.context.trace_id
    for name in stages:
        span = spans[name]
        assert span.parent is not None and span.parent.span_id == request.context.span_id, name
        assert span.context.trace_id == trace_id, name
    started = [spans[name].start_time or 0 for name in stages]
    assert started == sorted(started), "the stages in the order the flow runs them"
    scoring = spans["onnxruntime.run"]  # the ranker's own call (triton.infer with Triton), inside its stage
    assert scoring.parent is not None and scoring.parent.span_id == spans["rank"].context.span_id


async def test_a_traced_caller_continues_its_trace() -> None:
    exporter = InMemorySpanExporter()
    stop = telemetry.start(TelemetrySettings(), exporter=exporter)
    assert stop is not None
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        async with client(app_with(LoggingRecommender(), hot_route=True)) as http:
            await http.get("/v1/recommendations/u1", headers={"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"})
    finally:
        stop()
    (request,) = exporter.get_finished_spans()
    assert format(request.context.trace_id, "032x") == caller_trace


async def test_tracing_off_adds_no_span_and_no_work() -> None:
    exporter = InMemorySpanExporter()
    stop = telemetry.start(TelemetrySettings(), exporter=exporter)
    assert stop is not None
    stop()  # on, then off again: nothing may still reach the exporter
    assert telemetry.start(TelemetrySettings()) is None, "no endpoint: tracing stays off"
    assert not telemetry.enabled()
    assert telemetry.span("a") is telemetry.stage_span("cache"), "one shared no-op, nothing built per call"
    recommender = await make(FakeRanker())
    async with client(app_with(recommender, hot_route=True)) as http:
        response = await http.get("/v1/recommendations/1?n=3")
    await recommender.drain()
    assert response.json()["source"] == "realtime"
    assert exporter.get_finished_spans() == ()


def test_an_endpoint_turns_tracing_on_with_the_otlp_exporter() -> None:
    stop = telemetry.start(TelemetrySettings(otlp_endpoint="http://127.0.0.1:4317", service_name="t"))
    try:
        assert stop is not None and telemetry.enabled()
    finally:
        if stop is not None:
            stop()
    assert not telemetry.enabled()


def test_sampling_states_its_rule() -> None:
    with pytest.raises(ValueError, match="must be an integer >= 1, got 0"):
        TelemetrySettings(sample_one_in=0)


def test_settings_turn_tracing_on_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSERVE_TELEMETRY_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("RECSERVE_TELEMETRY_LOG_FORMAT", "text")
    settings = Settings()
    assert settings.telemetry.otlp_endpoint == "http://collector:4317"
    assert settings.telemetry.log_format == "text"
    assert Settings.model_fields["telemetry"].default_factory is not None
    monkeypatch.delenv("RECSERVE_TELEMETRY_OTLP_ENDPOINT")
    assert Settings().telemetry.otlp_endpoint is None, "off by default"
