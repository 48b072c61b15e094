"""The id rule for user and item ids: the API refuses any other id (``orchestrator/api``), and the offline
pipeline refuses data files whose ids the API could not serve (``export/interactions.py``). Nothing to
import here: the pipeline reads the rule without the service's graph."""

from __future__ import annotations

# What may appear in a path, a Redis key and an invalidation message (no space).
ID_PATTERN = r"^[A-Za-z0-9._:@-]+$"
ID_MAX_LENGTH = 64
