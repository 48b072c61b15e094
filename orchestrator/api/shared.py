"""What more than one endpoint uses: the id type (the rule of ``orchestrator/ids.py``), the small response
models, and the services a route serves from."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from orchestrator.composition import Services
from orchestrator.ids import ID_MAX_LENGTH, ID_PATTERN

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
