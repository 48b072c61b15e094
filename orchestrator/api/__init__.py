"""The HTTP API: one module per endpoint, each owning its spec (what is valid, its OpenAPI declaration)
and its route. ``orchestrator/app.py`` creates the app and includes these routers; the hot route
(``orchestrator/hot_route.py``) answers the busiest two endpoints below FastAPI through the same parsers."""
