"""The benchmarks (``make bench`` = ``python -m bench``): ranker, dynamic batching, Redis data plane and
the service over HTTP, written into docs/BENCHMARKS.md and docs/measurements.json.

They start real processes through the local stack (``stack/``), build and load artifacts through
``export``, and reach the service over HTTP and Triton over gRPC: no ``orchestrator`` module is imported.
"""
