"""URL paths that code below the API reads too: the request-id middleware names spans and access lines by
route (``orchestrator/request_id.py``), which must not import the endpoints that serve the paths
(``orchestrator/api``, whose event endpoint imports the middleware's id rule)."""

from __future__ import annotations

RECOMMENDATIONS_PREFIX = "/v1/recommendations/"
RECOMMENDATIONS_PATH = RECOMMENDATIONS_PREFIX + "{user_id}"
