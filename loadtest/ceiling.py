"""The framework's ceiling: one FastAPI route that returns a fixed body, served exactly as the
orchestrator is (uvicorn, uvloop, httptools, 1 worker, no access log: ``stack.launch.serve``, whose options
tests/unit/test_layering.py pins to those of orchestrator/__main__.py).

It answers the recommendation URL with a body of the same shape and size as a real 20-item answer, so
that the same locust user (``CacheHitUser``) can be pointed at either and the difference is what the
service does per request, not what the client or the wire does.

    python -m loadtest.ceiling --port 8090
"""

from __future__ import annotations

import argparse

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

from stack.launch import serve

BODY = orjson.dumps(
    {
        "user_id": "1",
        "items": [{"item_id": str(1000 + i), "score": round(0.9 - i * 0.01, 6)} for i in range(20)],
        "source": "ceiling",
        "model_version": "ceiling",
    }
)


def create_app() -> FastAPI:
    app = FastAPI(title="ceiling")

    @app.get("/v1/recommendations/{user_id}")
    async def recommendations(user_id: str) -> Response:
        return Response(BODY, media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ceiling")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    serve("loadtest.ceiling:create_app", args.host, args.port)


if __name__ == "__main__":
    main()
