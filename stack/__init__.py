"""The local stack: real redis-server, tritonserver and orchestrator processes on one machine.

``python -m stack up`` (``make up``) is the supervisor; the tests, the benchmarks (``bench/``) and the load
test (``loadtest/``) start their processes through this package. It builds, loads and pre-computes through
``export`` and starts the orchestrator as a process: it imports no ``orchestrator`` module.
"""
