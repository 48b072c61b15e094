"""``python -m orchestrator``: serve the app with uvicorn (uvloop + httptools, with the limits of
``orchestrator/edge.py``)."""

from __future__ import annotations

import argparse
import logging

import uvicorn


def serve(factory: str, host: str, port: int, workers: int = 1, log_level: str = "warning") -> None:
    """How the service is served; the load test's ceiling app (loadtest/ceiling.py) is served the same way."""
    # The service's own loggers at the same level as uvicorn's (else only warnings reach stderr, bare).
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        factory,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        # httptools with the header, time and connection limits of RECSERVE_LIMITS_* (uvicorn's own have none).
        http="orchestrator.edge:EdgeHttpProtocol",
        log_level=log_level,
        access_log=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestrator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    serve("orchestrator.app:create_app", args.host, args.port, args.workers, args.log_level)


if __name__ == "__main__":
    main()
