"""`publish` waits until every Triton replica serves the new version, not whichever one a request reaches.

Two tiny HTTP servers on 127.0.0.1 stand in for two Triton pods. No hostname here resolves to both (that
would take an /etc/hosts entry), so the wait is driven through the list of replica URLs it takes, and the
resolution into that list is checked on its own with names that do resolve here."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from export.release import ReleaseError, replica_urls, wait_until_every_replica_serves

READY_PATH = "/v2/models/ranker_onnx/versions/2/ready"


class Replica:
    """A Triton stand-in answering the version's readiness: 200 once ``ready`` is set, 400 before."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.asked = threading.Event()
        self.paths: list[str] = []
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                replica.paths.append(self.path)
                self.send_response(200 if replica.ready.is_set() and self.path == READY_PATH else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()
                replica.asked.set()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@contextmanager
def replicas(count: int) -> Iterator[list[Replica]]:
    running = [Replica() for _ in range(count)]
    threads = [threading.Thread(target=r.server.serve_forever, daemon=True) for r in running]
    for thread in threads:
        thread.start()
    try:
        yield running
    finally:
        for r in running:
            r.server.shutdown()
            r.server.server_close()


def test_the_wait_ends_only_when_every_replica_serves_the_version() -> None:
    with replicas(2) as (ready, late):
        ready.ready.set()
        outcome: list[BaseException | None] = []

        def wait() -> None:
            try:
                wait_until_every_replica_serves(lambda: [ready.url, late.url], "ranker_onnx", 2, 30, every_s=0.01)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        assert late.asked.wait(10), "the wait must ask the second replica, not only the first"
        late.asked.clear()
        assert late.asked.wait(10), "the wait must ask the late replica again while it is not ready"
        assert not outcome, "the wait returned while one replica did not serve the version"
        late.ready.set()
        waiter.join(10)
        assert outcome == [None]
        assert READY_PATH in ready.paths and READY_PATH in late.paths


def test_a_replica_that_never_serves_fails_the_wait_naming_it() -> None:
    with replicas(2) as (ready, never):
        ready.ready.set()
        with pytest.raises(ReleaseError, match=rf"but 1 of 2 replicas did not: {never.url} \(is the repository"):
            wait_until_every_replica_serves(lambda: [ready.url, never.url], "ranker_onnx", 2, 0.2, every_s=0.01)


def test_no_replica_at_all_is_not_served() -> None:
    expected = "expected every replica of Triton to serve ranker_onnx version 2 within 0 s, but its host resolved to"
    with pytest.raises(ReleaseError, match=expected):
        wait_until_every_replica_serves(list, "ranker_onnx", 2, 0.05, every_s=0.01)


def test_replica_urls_are_one_per_address_of_the_host() -> None:
    assert replica_urls("http://127.0.0.1:8000") == ["http://127.0.0.1:8000"]
    assert replica_urls("http://[::1]:8000/") == ["http://[::1]:8000"]
    # localhost resolves to 127.0.0.1 and often ::1 too: one replica, reached over IPv4.
    assert replica_urls("http://localhost:8000") == ["http://127.0.0.1:8000"]
    assert replica_urls("http://does-not-resolve.invalid:8000") == []
    with pytest.raises(ReleaseError, match="expected Triton's HTTP address as http://host:port, but found 'triton'"):
        replica_urls("triton")
