"""The ranker's input contract, shared by the offline export and the online service.

One place names every tensor, its dtype and its width, and every categorical vocabulary. The export
builds the ONNX/TorchScript signatures and Triton configs from it; the orchestrator encodes requests
with it. ``export`` imports this module; nothing here imports ``export`` or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Categorical vocabularies. Index 0 is always "unknown" so that an unseen value has a home.
PAGE_TYPES: tuple[str, ...] = ("unknown", "home", "product", "cart", "search", "category")
DEVICES: tuple[str, ...] = ("unknown", "web", "ios", "android", "tv")

AGE_BUCKETS: tuple[int, ...] = (0, 18, 25, 35, 45, 50, 56)  # lower bounds, MovieLens-1M style
OCCUPATIONS: tuple[str, ...] = (
    "unknown",
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)
GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
YEAR_BUCKETS: tuple[int, ...] = (0, 1950, 1970, 1980, 1990, 1995, 2000, 2010)  # lower bounds
POPULARITY_BUCKETS = 10  # deciles of training interaction counts

# Feature columns, in tensor column order, with vocabulary sizes (index 0 = unknown).
USER_FEATURES: tuple[tuple[str, int], ...] = (
    ("age_bucket", len(AGE_BUCKETS) + 1),
    ("gender", 3),  # unknown, F, M
    ("occupation", len(OCCUPATIONS)),
)
ITEM_FEATURES: tuple[tuple[str, int], ...] = (
    ("genre", len(GENRES)),
    ("year_bucket", len(YEAR_BUCKETS) + 1),
    ("popularity_bucket", POPULARITY_BUCKETS + 1),
)
CONTEXT_FEATURES: tuple[tuple[str, int], ...] = (
    ("page_type", len(PAGE_TYPES)),
    ("device", len(DEVICES)),
)


@dataclass(frozen=True)
class TensorSpec:
    """One named ranker tensor; ``width`` is the per-row size (the batch axis is implicit)."""

    name: str
    dtype: str  # numpy dtype name
    width: int


def ranker_inputs(embedding_dim: int) -> tuple[TensorSpec, ...]:
    """The ranker's inputs, in the order the model's forward() takes them."""
    return (
        TensorSpec("user_embedding", "float32", embedding_dim),
        TensorSpec("item_embedding", "float32", embedding_dim),
        TensorSpec("user_features", "int64", len(USER_FEATURES)),
        TensorSpec("item_features", "int64", len(ITEM_FEATURES)),
        TensorSpec("context_features", "int64", len(CONTEXT_FEATURES)),
    )


RANKER_OUTPUT = TensorSpec("score", "float32", 1)


def context_index(vocabulary: tuple[str, ...], value: str) -> int:
    """Index of ``value`` in a context vocabulary; 0 (unknown) when absent."""
    try:
        return vocabulary.index(value)
    except ValueError:
        return 0


# Segments for popular lists: anonymous traffic and the last-resort fallback. A known user's segment is
# their age bucket; everyone else (and any unknown bucket) falls into the global segment.
GLOBAL_SEGMENT = "global"
SEGMENTS: tuple[str, ...] = (GLOBAL_SEGMENT, *(f"age{lower}" for lower in AGE_BUCKETS))


def user_segment(age_bucket: int) -> str:
    """Segment of a user from their ``age_bucket`` feature (1-based; 0 = unknown -> global)."""
    if 1 <= age_bucket <= len(AGE_BUCKETS):
        return f"age{AGE_BUCKETS[age_bucket - 1]}"
    return GLOBAL_SEGMENT
