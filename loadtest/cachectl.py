"""Emptying the recommendation cache of a running stack, as a flush or a Redis failover at peak would: the
benchmark's reset, never a request path (it SCANs).

Two layers (orchestrator/cache.py): the shared lists in Redis, one hash per user, and each replica's
in-process layer. The load test reaches the service over HTTP only, so it names the key shape instead of
importing it, and it empties the in-process layers the way the service itself does after a lost
invalidation channel: a replica that resubscribes forgets every list it held, so killing the pub/sub
connections makes every replica empty its local layer (lookups meanwhile go to Redis, which is empty too).
"""

from __future__ import annotations

from redis import Redis

# The orchestrator's shared recommendation cache: one hash per user, ``rc:{u:<user id>}`` (the store's
# key builder ``rec_cache``; tests/unit/test_layering.py pins that this pattern matches it).
REC_CACHE_PATTERN = "rc:*"


def flush_lists(client: Redis) -> int:
    """Delete every cached list in Redis; returns how many users' hashes went."""
    doomed = list(client.scan_iter(match=REC_CACHE_PATTERN, count=1000))
    for start in range(0, len(doomed), 1000):
        client.delete(*doomed[start : start + 1000])
    return len(doomed)


def empty_cache(redis_url: str) -> dict[str, int]:
    """Both layers: the Redis lists, then every replica's local layer (their invalidation channels are cut,
    they resubscribe and forget), then the Redis lists again (what was computed in between)."""
    client = Redis.from_url(redis_url)
    try:
        users = flush_lists(client)
        killed = int(client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
        users += flush_lists(client)
        return {"users": users, "pubsub_connections": killed}
    finally:
        client.close()
