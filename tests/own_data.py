"""A small own data set in the contract's files (export/interactions.py): string ids, both timestamp forms,
weights, event types, and user and item feature tables. Seeded; a few hundred users."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

CATEGORIES = ("shoes", "books", "garden", "toys")


def write_shop(
    folder: Path, n_users: int = 300, n_items: int = 200, per_user: int = 20, seed: int = 3
) -> tuple[Path, Path, Path]:
    """interactions.csv, users.csv and items.csv in ``folder``; each user mostly buys from one category."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = [f"sku-{k:04x}" for k in range(n_items)]
    item_category = rng.integers(0, len(CATEGORIES), n_items)
    users = [f"cust-{k:05d}" for k in range(n_users)]
    taste = rng.integers(0, len(CATEGORIES), n_users)
    start = 1_700_000_000
    with (folder / "interactions.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["user_id", "item_id", "timestamp", "weight", "event_type"])
        for u, user in enumerate(users):
            liked = np.flatnonzero(item_category == taste[u])
            picks = np.where(
                rng.random(per_user) < 0.8, rng.choice(liked, per_user), rng.integers(0, n_items, per_user)
            )
            stamps = np.sort(start + rng.integers(0, 90 * 86_400, per_user))
            for k, (item, stamp) in enumerate(zip(picks.tolist(), stamps.tolist(), strict=True)):
                # Both timestamp forms in one file: epoch seconds and ISO 8601.
                when = str(stamp) if k % 2 else datetime.fromtimestamp(stamp, UTC).isoformat()
                writer.writerow([user, items[item], when, 1 + k % 3, ("view", "click", "purchase")[k % 3]])
    with (folder / "users.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["user_id", "country", "age"])
        for u, user in enumerate(users):
            writer.writerow([user, ("DE", "FR", "US")[u % 3], 18 + u % 50])
    with (folder / "items.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["item_id", "category", "price"])
        for k, item in enumerate(items):
            writer.writerow([item, CATEGORIES[item_category[k]], f"{5 + (k * 7) % 95}.99"])
    return folder / "interactions.csv", folder / "users.csv", folder / "items.csv"
