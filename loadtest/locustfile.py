"""Realistic traffic for the recommendation service (see loadtest/traffic.py for the model).

Run by hand against a running stack (``make up``):

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 ShopperUser

or by the driver (``python -m loadtest``), which sets these environment variables:

- ``LOADTEST_BUNDLE``: the data bundle whose users/items/segments to draw (default build/artifacts/synthetic/v1);
- ``LOADTEST_RATE_PER_USER``: requests/s each locust user offers (default 10): offered load = users x rate;
- ``LOADTEST_STEPS`` (``"5,10,20"``) and ``LOADTEST_STEP_S``: step load, one user count per step; each
  step's first ``LOADTEST_WARMUP_S`` are not measured; the first ``LOADTEST_FIXED_STEPS`` always run (the fixed
  load every scenario is compared at); after them, two steps in a row that miss the service level
  (loadtest/results.py) end the run; the first ``LOADTEST_WARM_STEPS`` of them only warm the cache
  (marked ``warmup``, left out of every figure);
- ``LOADTEST_OUT``: where to write the per-step figures and the timeline (JSON);
- ``LOADTEST_CPU_PIDS`` (``"orchestrator=123,redis=456"``): processes whose CPU time to sample.
- ``LOADTEST_SCRAPE_METRICS`` (``1``): ``0`` leaves the service's /metrics alone (several workers).
- ``LOADTEST_REDIS_URL`` and ``LOADTEST_EMPTY_CACHE_AT`` (``"2"``, or ``"all"``): empty the service's cache
  (loadtest/cachectl.py: the Redis lists and every replica's local layer) as these steps begin, under load;
  with ``all`` the never-asked pool (``NeverAskedUser``) starts afresh with each step, so that no request of a
  step asks what an earlier one did.
- ``LOADTEST_STOP_ON`` (``slo``): ``latency`` ends the run on two steps in a row over p99 100 ms or 1% failed,
  whatever the fallbacks (the never-asked scenario, where answering from the pre-computed list is the design).

Personalised answers are named by their ``source`` (``recs [cache]``, ``recs [realtime]``, ...), so
locust's own statistics, CSV and HTML report split latency by where the answer came from.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from locust import LoadTestShape, constant_throughput, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment

from loadtest import cachectl, procstat
from loadtest.results import StepSamples, summarize
from loadtest.traffic import (
    EVENT_DIST,
    MIX_EVENTS,
    MIX_RECOMMENDATIONS,
    MIX_SEGMENTS,
    NeverAsked,
    Traffic,
    draw_context,
    source_of,
)

log = logging.getLogger("loadtest")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO_ROOT / "build" / "artifacts" / "synthetic" / "v1"
SAMPLE_EVERY_S = 1.0


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


# Writes need a key: the driver starts the orchestrator with it and passes it here.
EVENT_HEADERS = {"X-API-Key": os.environ.get("LOADTEST_API_KEY", "")}


@dataclass
class Plan:
    """The step plan, read from the environment once per run."""

    steps: list[int]
    step_s: float
    warmup_s: float
    fixed_steps: int
    warm_steps: int
    out: Path | None
    cpu_pids: dict[str, int]
    redis_url: str = ""
    empty_cache_at: frozenset[int] | None = frozenset()  # None: every step
    stop_on: str = "slo"

    @classmethod
    def from_env(cls) -> Plan:
        raw = os.environ.get("LOADTEST_STEPS", "")
        out = os.environ.get("LOADTEST_OUT")
        return cls(
            steps=[int(s) for s in raw.split(",") if s.strip()],
            step_s=_env_float("LOADTEST_STEP_S", 12.0),
            warmup_s=_env_float("LOADTEST_WARMUP_S", 3.0),
            fixed_steps=int(os.environ.get("LOADTEST_FIXED_STEPS", "1")),
            warm_steps=int(os.environ.get("LOADTEST_WARM_STEPS", "0")),
            out=Path(out) if out else None,
            cpu_pids=procstat.parse_pids(os.environ.get("LOADTEST_CPU_PIDS", "")),
            redis_url=os.environ.get("LOADTEST_REDIS_URL", ""),
            empty_cache_at=_steps_set(os.environ.get("LOADTEST_EMPTY_CACHE_AT", "")),
            stop_on=os.environ.get("LOADTEST_STOP_ON", "slo"),
        )

    def empties_cache_at(self, step: int) -> bool:
        return bool(self.redis_url) and (self.empty_cache_at is None or step in self.empty_cache_at)


def _steps_set(raw: str) -> frozenset[int] | None:
    """``"all"``: None (every step); else the comma-separated step indexes."""
    if raw.strip() == "all":
        return None
    return frozenset(int(s) for s in raw.split(",") if s.strip())


@dataclass
class Recorder:
    """Samples of the current step's measured window, plus a 1 s timeline of /metrics and CPU time."""

    plan: Plan
    started: float = 0.0
    step: int = -1
    misses_in_a_row: int = 0
    measuring: bool = False
    window_started: float = 0.0
    samples: StepSamples = field(default_factory=StepSamples)
    cpu_at_window_start: dict[str, float] = field(default_factory=dict)
    own_cpu_at_window_start: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    # Answers since the last timeline point, as the client saw them: personalised ones by source, plus
    # "other" (segments, events) and "failed"; the timeline keeps one count per second.
    answers: Counter[str] = field(default_factory=Counter)
    cache_emptied: list[dict[str, Any]] = field(default_factory=list)  # when, at which step, what went
    repeats: int = 0  # never-asked requests that had to repeat a combination (the pool ran out)

    def cpu(self) -> dict[str, float]:
        return {name: procstat.tree_cpu_seconds(pid) for name, pid in self.plan.cpu_pids.items()}

    def begin_window(self) -> None:
        self.samples = StepSamples()
        self.window_started = time.monotonic()
        self.cpu_at_window_start = self.cpu()
        self.own_cpu_at_window_start = procstat.tree_cpu_seconds(os.getpid())
        self.measuring = True

    def end_window(self, users: int, rate: float) -> dict[str, Any]:
        self.measuring = False
        window_s = time.monotonic() - self.window_started
        cpu_now = self.cpu()
        summary = summarize(self.samples, window_s)
        cpu_s = {name: round(cpu_now[name] - self.cpu_at_window_start.get(name, 0.0), 3) for name in cpu_now}
        # Kept apart from cpu_s (the service's processes): on a shared machine it says how much of the
        # cores the load generator itself took at each step.
        load_generator_cpu_s = round(procstat.tree_cpu_seconds(os.getpid()) - self.own_cpu_at_window_start, 3)
        summary = {
            "step": self.step,
            "warmup": self.step < self.plan.warm_steps,
            "users": users,
            "offered_rps": round(users * rate, 1),
            "started_s": round(self.window_started - self.started, 2),
            **summary,
            "cpu_s": cpu_s,
            "cpu_cores": {name: round(s / window_s, 3) for name, s in cpu_s.items()} if window_s > 0 else {},
            "load_generator_cpu_s": load_generator_cpu_s,
            "load_generator_cores": round(load_generator_cpu_s / window_s, 3) if window_s > 0 else 0.0,
        }
        self.steps.append(summary)
        return summary

    def write(self) -> None:
        if self.plan.out is None:
            return
        self.plan.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "steps": self.steps,
            "timeline": self.timeline,
            "skew": TRAFFIC.user_skew if TRAFFIC else "",
            "cache_emptied": self.cache_emptied,
            "never_asked_repeats": self.repeats,
        }
        self.plan.out.write_text(json.dumps(payload, indent=1))


RECORDER: Recorder | None = None
TRAFFIC: Traffic | None = None
RATE_PER_USER = _env_float("LOADTEST_RATE_PER_USER", 10.0)


def traffic() -> Traffic:
    global TRAFFIC
    if TRAFFIC is None:
        bundle = Path(os.environ.get("LOADTEST_BUNDLE", DEFAULT_BUNDLE))
        TRAFFIC = Traffic.from_bundle(bundle, _env_float("LOADTEST_ZIPF_S", 1.0))
    return TRAFFIC


COUNTERS_KEPT = (
    "recserve_cache_hits_total{",
    "recserve_cache_misses_total{",
    "recserve_fallbacks_total{",
    "recserve_event_loop_lag_seconds_bucket{",
    "recserve_stage_latency_seconds_bucket{",
    "recserve_stage_latency_seconds_count{",
    "recserve_redis_calls_per_batch_sum ",
    "recserve_redis_calls_per_batch_count ",
    "recserve_gc_pause_seconds_sum{",
    "recserve_gc_pause_seconds_count{",
    "recserve_compute_limit ",
    "recserve_compute_in_flight ",
)


def _scrape(url: str) -> dict[str, float] | None:
    """The cache and fallback counters of the service's /metrics (None where there are none, as on the
    ceiling app)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(COUNTERS_KEPT):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def _by_label(counters: dict[str, float], prefix: str, label: str) -> dict[str, float]:
    """The series of one metric (``prefix``, up to its ``{``) keyed by the value of one of its labels."""
    return {
        name.partition(f'{label}="')[2].partition('"')[0]: value
        for name, value in counters.items()
        if name.startswith(prefix)
    }


def _stages_over(counters: dict[str, float], bound: str) -> dict[str, float]:
    """Per stage of the request flow, how many took longer than ``bound`` (a bucket label such as
    ``le="0.03"``): which part a burst of late answers waited on."""
    slower: dict[str, float] = {}
    for name, at_most in counters.items():
        if name.startswith("recserve_stage_latency_seconds_bucket{") and bound in name:
            stage = name.partition('stage="')[2].partition('"')[0]
            slower[stage] = counters.get(name.replace(bound, 'le="+Inf"'), 0.0) - at_most
    return slower


def _sample_forever(environment: Environment, recorder: Recorder) -> None:
    scrape = os.environ.get("LOADTEST_SCRAPE_METRICS", "1") != "0"
    metrics_url = f"{environment.host}/metrics" if environment.host and scrape else None
    while True:
        point: dict[str, Any] = {"t": round(time.monotonic() - recorder.started, 2), "step": recorder.step}
        counters = _scrape(metrics_url) if metrics_url else None
        if counters is None:
            metrics_url = None  # no /metrics here: stop asking
        else:
            point["hits_local"] = counters.get('recserve_cache_hits_total{layer="local"}', 0.0)
            point["hits_redis"] = counters.get('recserve_cache_hits_total{layer="redis"}', 0.0)
            point["misses"] = counters.get('recserve_cache_misses_total{layer="redis"}', 0.0)
            # Why answers were not computed, over time: shows what set off an overload and what kept it going.
            point["fallbacks"] = _by_label(counters, "recserve_fallbacks_total{", "reason")
            # Time in full (generation 2) collections, and how many: pauses every request waits out.
            point["gc_full_s"] = counters.get('recserve_gc_pause_seconds_sum{generation="2"}', 0.0)
            point["gc_full_count"] = counters.get('recserve_gc_pause_seconds_count{generation="2"}', 0.0)
            # Store calls and the round trips they took (coalescing): calls per batch = their ratio.
            point["redis_calls"] = counters.get("recserve_redis_calls_per_batch_sum", 0.0)
            point["redis_batches"] = counters.get("recserve_redis_calls_per_batch_count", 0.0)
            point["stages_over_30ms"] = _stages_over(counters, 'le="0.03"')
            # Admission (orchestrator/admission.py): the limit on computations at once, and how many ran.
            point["compute_limit"] = counters.get("recserve_compute_limit")
            point["compute_in_flight"] = counters.get("recserve_compute_in_flight")
            # Event-loop lag samples (every 5 ms) at or under each bound: the backlog the requests wait behind.
            point["loop_lag_at_most"] = _by_label(counters, "recserve_event_loop_lag_seconds_bucket{", "le")
        point["cpu"] = recorder.cpu()
        point["answers"] = dict(recorder.answers)
        recorder.answers.clear()
        recorder.timeline.append(point)
        gevent.sleep(SAMPLE_EVERY_S)


def recorder() -> Recorder:
    # The load shape ticks before test_start fires: whichever comes first creates the recorder.
    global RECORDER
    if RECORDER is None:
        RECORDER = Recorder(Plan.from_env(), started=time.monotonic())
    return RECORDER


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    traffic()  # read the bundle before the first request, not during it
    if recorder().plan.out is not None:
        gevent.spawn(_sample_forever, environment, recorder())


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    if RECORDER is not None:
        if RECORDER.measuring and environment.runner is not None:
            RECORDER.end_window(environment.runner.user_count, RATE_PER_USER)
        RECORDER.write()


@events.request.add_listener
def _on_request(name: str, response_time: float, exception: BaseException | None, **_: Any) -> None:
    if RECORDER is None:
        return
    kind, _sep, rest = name.partition(" ")
    source = rest.strip("[]") if kind == "recs" else None
    RECORDER.answers["failed" if exception is not None else (source or "other")] += 1
    if RECORDER.measuring:
        RECORDER.samples.add(kind, response_time, exception is None, source)


class _Recommendations(FastHttpUser):
    abstract = True
    wait_time = constant_throughput(RATE_PER_USER)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.traffic = traffic()

    def recommend(self, page_type: str, device: str, user: str | None = None) -> None:
        user = user or self.traffic.users.draw(self.rng)
        url = f"/v1/recommendations/{user}?n=20&page_type={page_type}&device={device}"
        with self.client.get(url, name="recs", catch_response=True) as response:
            if response.status_code == 200 and response.content:
                response.request_meta["name"] = f"recs [{source_of(response.content)}]"
            else:
                response.failure(f"status {response.status_code}")


class ShopperUser(_Recommendations):
    """The realistic mix: personalised lists in context, anonymous segment lists, events (incl. purchases)."""

    @task(MIX_RECOMMENDATIONS)
    def recommendations(self) -> None:
        self.recommend(*draw_context(self.rng))

    @task(MIX_SEGMENTS)
    def segment(self) -> None:
        segment = self.rng.choice(self.traffic.segments)
        self.client.get(f"/v1/segments/{segment}/recommendations?n=20", name="segment")

    @task(MIX_EVENTS)
    def event(self) -> None:
        kind = EVENT_DIST.draw(self.rng)
        body = {"user_id": self.traffic.users.draw(self.rng), "item_id": self.rng.choice(self.traffic.items)}
        self.client.post("/v1/events", json=body | {"type": kind}, name=f"event {kind}", headers=EVENT_HEADERS)


class CacheHitUser(_Recommendations):
    """Only personalised lists, one context: after the first pass every answer is a cache hit. Pointed at
    the ceiling app (loadtest/ceiling.py) it sends the same requests to a route that does nothing."""

    @task
    def recommendations(self) -> None:
        self.recommend("home", "web")


_recorder = recorder

MISS_SHARE = _env_float("LOADTEST_MISS_SHARE", 0.08)


class Mix90User(_Recommendations):
    """The reference design's mix: a page type and a device drawn per request, as ``ShopperUser`` draws them
    (each context is its own cached list, so the hit rate is one a user would see), and before
    ``MISS_SHARE`` of the requests the same user buys something, which invalidates their lists and makes
    that answer a computed one. The hit rate actually reached is read from /metrics and reported, not
    assumed."""

    @task
    def recommendations(self) -> None:
        user = self.traffic.users.draw(self.rng)
        if self.rng.random() < MISS_SHARE:
            body = {"user_id": user, "item_id": self.rng.choice(self.traffic.items), "type": "purchase"}
            self.client.post("/v1/events", json=body, name="event purchase", headers=EVENT_HEADERS)
        self.recommend(*draw_context(self.rng), user)


class ContextUser(_Recommendations):
    """Personalised lists only, a page type and a device drawn per request: the traffic of the cold-cache
    scenario (loadtest/goodput.py), where the answers' sources are what is measured."""

    @task
    def recommendations(self) -> None:
        self.recommend(*draw_context(self.rng))


NEVER_ASKED: NeverAsked | None = None


def never_asked() -> NeverAsked:
    """One pool for the whole locust process: no two of its users ask the same combination."""
    global NEVER_ASKED
    if NEVER_ASKED is None:
        NEVER_ASKED = NeverAsked(traffic().users, random.Random())
    return NEVER_ASKED


class NeverAskedUser(_Recommendations):
    """Every request a (user, page type, device) never asked before (loadtest/traffic.py ``NeverAsked``):
    every request a cache miss. Run with ``LOADTEST_EMPTY_CACHE_AT=all`` so that each step starts afresh."""

    @task
    def recommendations(self) -> None:
        drawn = never_asked().draw()
        if drawn is None:  # the pool ran out within one step: counted, so the report can say so
            recorder().repeats += 1
            self.recommend(*draw_context(self.rng))
            return
        user, page_type, device = drawn
        self.recommend(page_type, device, user)


if os.environ.get("LOADTEST_STEPS"):

    class StepLoad(LoadTestShape):
        """One user count per step; stops at the first step past the fixed ones that misses the SLO."""

        def tick(self) -> tuple[int, float] | None:
            recorder = _recorder()
            plan = recorder.plan
            run_s = self.get_run_time()
            index = int(run_s // plan.step_s)
            if index != recorder.step:
                if recorder.measuring and recorder.step >= 0:
                    done = recorder.end_window(plan.steps[recorder.step], RATE_PER_USER)
                    _print_step(done)
                    # Two misses in a row past the fixed steps: saturated (one alone may be the cold cache).
                    past_fixed = recorder.step >= plan.fixed_steps
                    ok = done["latency_ok"] if plan.stop_on == "latency" else done["slo_ok"]
                    recorder.misses_in_a_row = 0 if ok or not past_fixed else recorder.misses_in_a_row + 1
                    if recorder.misses_in_a_row >= 2:
                        return None
                if index >= len(plan.steps):
                    return None
                recorder.step = index
                if plan.empties_cache_at(index):
                    _empty_cache(recorder, index)
            warmed_up = run_s - index * plan.step_s >= plan.warmup_s
            if warmed_up and not recorder.measuring and len(recorder.steps) == index:  # not yet measured
                recorder.begin_window()
            users = plan.steps[index]
            return users, float(users)  # spawn the whole step at once


def _empty_cache(recorder: Recorder, step: int) -> None:
    """Under load, as the step begins: the service's cache (both layers), and the never-asked pool with it."""
    emptied = cachectl.empty_cache(recorder.plan.redis_url)
    if NEVER_ASKED is not None:
        NEVER_ASKED.reset()
    recorder.cache_emptied.append({"t": round(time.monotonic() - recorder.started, 2), "step": step, **emptied})
    print(f"[loadtest] step {step + 1}: cache emptied ({emptied})", flush=True)


def _print_step(step: dict[str, Any]) -> None:
    verdict = "ok" if step["slo_ok"] else "MISSES SLO"
    cores = " ".join(f"{name} {value:.2f}" for name, value in step.get("cpu_cores", {}).items())
    print(
        f"[loadtest] step {step['step'] + 1}: {step['users']} users, offered {step['offered_rps']:g}/s, "
        f"achieved {step['achieved_rps']:g}/s, p50 {step.get('p50_ms', 0):g} ms, p99 {step.get('p99_ms', 0):g} ms, "
        f"fallbacks {step['fallback_share']:.1%}, failures {step['failure_share']:.1%} [{verdict}]"
        + (f"; cpu cores: {cores}" if cores else "")
        + f"; locust {step.get('load_generator_cores', 0.0):.2f}",
        flush=True,
    )
