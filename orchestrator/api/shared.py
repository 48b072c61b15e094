"""What more than one endpoint uses: the id rule, the small response models, and the services a route
serves from."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from orchestrator.composition import Services

# User and item ids: what may appear in a path, a Redis key and an invalidation message (no space).
ID_PATTERN = r"^[A-Za-z0-9._:@-]+$"
ID_MAX_LENGTH = 64
Id = Annotated[str, Field(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]


class ScoredItem(BaseModel):
    item_id: str
    score: float


class Problem(BaseModel):
    detail: str


def services_of(app: Any) -> Services:
    """What the lifespan built (``orchestrator/composition.py``), from the app a request came to."""
    services: Services = app.state.services
    return services
