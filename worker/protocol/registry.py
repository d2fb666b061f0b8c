"""The Redis key layout of one queue (:class:`RedisKeys`), the worker registry's read side (:class:`RegistryReader`)
and the clean-up of a test's namespace (:func:`delete_namespace`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class RedisKeys:
    """Redis key layout under one prefix (default ``maskinv``) and queue."""

    prefix: str = "maskinv"
    queue: str = "maskinv"

    @property
    def workers(self) -> str:
        """sorted set: worker name -> unix time of its last heartbeat"""
        return f"{self.prefix}:workers:{self.queue}"

    @property
    def worker_models(self) -> str:
        """hash: worker name -> JSON {"model": {...}, "heartbeat_s": float}"""
        return f"{self.prefix}:worker-models:{self.queue}"

    def result(self, digest: str) -> str:
        """string (JSON, with a TTL): one region's cached result"""
        return f"{self.prefix}:result:{digest}"


def delete_namespace(conn: Any, ns: str) -> None:
    """Delete every Redis key containing ``ns`` (a test's or benchmark's prefix/queue name: its queue, job,
    result, LET and example keys) and drop ``ns`` members from RQ's global ``rq:workers`` / ``rq:queues`` sets."""
    keys = list(conn.scan_iter(match=f"*{ns}*", count=1000))
    if keys:
        conn.delete(*keys)
    for registry in ("rq:workers", "rq:queues"):
        members = [m for m in conn.smembers(registry) if ns.encode() in m]
        if members:
            conn.srem(registry, *members)


class RegistryReader:
    """Reads the worker registry of one queue (layout: :class:`RedisKeys`); the backend's view of the workers.

    A worker is alive while its last beat is younger than 4 of its own heartbeat periods.
    ``worker.queue_worker.WorkerRegistry`` adds the worker side (beating, registering).
    """

    def __init__(self, connection: Any, queue: str, prefix: str = "maskinv", heartbeat_s: float = 5.0):
        self.connection = connection
        self.queue = queue
        self.prefix = prefix
        self.heartbeat_s = float(heartbeat_s)  # the default period for entries without one
        self.keys = RedisKeys(prefix=prefix, queue=queue)
        self.workers_key = self.keys.workers
        self.models_key = self.keys.worker_models

    @staticmethod
    def entry_json(model_info: Mapping[str, Any], heartbeat_s: float) -> str:
        """A worker's hash entry: ``{"model": {...}, "heartbeat_s": float}``."""
        return json.dumps({"model": dict(model_info), "heartbeat_s": float(heartbeat_s)})

    def _entry(self, raw: Any) -> tuple[dict[str, Any], float]:
        """(model info, heartbeat period) of a worker's hash entry."""
        try:
            data = json.loads(raw) if raw is not None else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        return dict(data.get("model") or {}), float(data.get("heartbeat_s") or self.heartbeat_s)

    def live_models(self) -> dict[str, dict[str, Any]]:
        """``{worker name: model info}`` of the workers whose last beat is younger than 4 of their periods."""
        beats = self.connection.zrange(self.workers_key, 0, -1, withscores=True)
        if not beats:
            return {}
        names = [n.decode() if isinstance(n, bytes) else n for n, _ in beats]
        now = time.time()
        out = {}
        for name, (_, last), raw in zip(names, beats, self.connection.hmget(self.models_key, names)):
            info, period = self._entry(raw)
            if last >= now - 4 * period:
                out[name] = info
        return out

    def live_workers(self) -> list[str]:
        return list(self.live_models())

    def _beat_is_fresh(self, name: str) -> bool | None:
        """Whether ``name``'s last beat is younger than 4 of its periods; None when it has no registry entry."""
        score = self.connection.zscore(self.workers_key, name)
        if score is None:
            return None
        _, period = self._entry(self.connection.hget(self.models_key, name))
        return float(score) >= time.time() - 4 * period

    def is_alive(self, name: str) -> bool:
        return self._beat_is_fresh(name) is True

    def is_dead(self, name: str) -> bool:
        """True only when ``name`` has a registry entry whose last beat is older than 4 of its periods.

        A worker with no entry at all is not called dead: after a Redis restart the registry is empty until each
        worker's next beat (at most one period), and a job a worker starts in that window is being run."""
        return self._beat_is_fresh(name) is False

    def model_id(self) -> str | None:
        """The model id served on this queue if all live workers agree on one, else None."""
        ids = {m.get("id") for m in self.live_models().values()}
        return ids.pop() if len(ids) == 1 else None
