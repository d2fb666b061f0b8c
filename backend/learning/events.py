"""Webhook events handled after the answer: Label Studio waits 1 s for a webhook (``WEBHOOK_TIMEOUT``), and
embedding an annotation's regions takes longer, so ``/webhook`` only queues the event and answers at once.

* Embedded mode (:class:`MemoryEvents`): a bounded in-process queue (at most MASKINV_WEBHOOK_QUEUE events
  waiting) drained by one thread in arrival order. Events still waiting when the process stops are lost; *Start
  training* (or ``maskinv-rebuild-examples``) re-derives every example from Label Studio.
* Queue mode (:class:`RedisEvents`): a Redis list, so no event is lost when a backend restarts. Keys
  (``{prefix}`` = MASKINV_REDIS_PREFIX)::

      {prefix}:webhook:events               list    event JSON, oldest at the right (at most MASKINV_WEBHOOK_QUEUE)
      {prefix}:webhook:taken:{consumer}     list    the event a consumer is handling (moved there atomically)
      {prefix}:webhook:alive:{consumer}     string  the consumer's heartbeat (TTL ALIVE_TTL_S)
      {prefix}:webhook:counts               hash    outcome counts of every backend process

  Each backend process runs one consumer thread; an event a dead consumer had taken (killed mid-event) is put
  back at the head of the queue by the next consumer that starts or polls. Events are handled once each, in
  arrival order per consumer (with several backend processes, two events of one annotation may be handled by two
  consumers at once; the store keeps the one that finishes last).

With MASKINV_WEBHOOK_QUEUE=0 events are handled before the answer, as before. A full queue answers 503 (the event
is counted as ``refused``; Label Studio does not send it again: *Start training* recovers it). The outcome counts
(``queued``, ``stored``, ``unchanged``, ``deleted``, ``rebuilt``, ``skipped``, ``failed``, ``refused``, plus
``pending``) are in ``GET /health`` under ``webhooks``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from typing import Any, Callable

from redis import ConnectionPool, Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

#: seconds a consumer counts as alive after its last heartbeat (queue mode)
ALIVE_TTL_S = 30
#: seconds a consumer waits on an empty queue before it looks for events of dead consumers again
POLL_S = 5.0
#: outcome names counted (an EventOutcome's ``status``; ``failed`` when handling raised)
OUTCOMES = ("stored", "unchanged", "deleted", "rebuilt", "skipped", "ignored", "failed")

Handler = Callable[[dict[str, Any]], Any]


class EventsFull(Exception):
    """The queue holds MASKINV_WEBHOOK_QUEUE events already: this one is refused (503)."""


def outcome_of(handle: Handler, event: dict[str, Any]) -> str:
    """Handle one event; its outcome name (``failed`` when it raised: logged with the reason)."""
    try:
        outcome = handle(event)
    except Exception as exc:  # noqa: BLE001 - one bad event must not stop the consumer
        log.warning("webhook %s failed: %s: %s", str(event.get("action"))[:60], exc.__class__.__name__,
                    str(exc)[:300])
        return "failed"
    status = str(getattr(outcome, "status", "ignored"))
    return status if status in OUTCOMES else "ignored"


class MemoryEvents:
    """Embedded mode: a bounded queue drained by one daemon thread (module docstring)."""

    def __init__(self, handle: Handler, capacity: int):
        self.handle = handle
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=max(1, capacity))
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._thread = threading.Thread(target=self._loop, name="maskinv-webhooks", daemon=True)
        self._thread.start()

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1

    def put(self, event: dict[str, Any]) -> None:
        """Queue ``event``; raises EventsFull when MASKINV_WEBHOOK_QUEUE events are waiting."""
        with self._lock:
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self._counts["refused"] = self._counts.get("refused", 0) + 1
                raise EventsFull() from None
            self._busy += 1
            self._counts["queued"] = self._counts.get("queued", 0) + 1

    def _loop(self) -> None:
        while True:
            event = self._queue.get()
            name = outcome_of(self.handle, event)
            with self._lock:
                self._counts[name] = self._counts.get(name, 0) + 1
                self._busy -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every queued event was handled (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "pending": self._busy}


class RedisEvents:
    """Queue mode: a Redis list with per-consumer taken lists, so no event is lost on a restart (module
    docstring)."""

    def __init__(self, handle: Handler, connection: Any, prefix: str, capacity: int, start: bool = True):
        self.handle = handle
        self.connection = connection
        self.capacity = max(1, capacity)
        self._blocking = blocking_connection(connection, POLL_S + 10)
        self.events_key = f"{prefix}:webhook:events"
        self.counts_key = f"{prefix}:webhook:counts"
        self._taken_prefix = f"{prefix}:webhook:taken:"
        self._alive_prefix = f"{prefix}:webhook:alive:"
        self.consumer = uuid.uuid4().hex[:16]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="maskinv-webhooks", daemon=True)
            self._thread.start()
            threading.Thread(target=self._beat_loop, name="maskinv-webhooks-beat", daemon=True).start()

    def _beat_loop(self) -> None:
        """Beat while the process lives, also while an event takes long (its taken list is then not recovered)."""
        while not self._stop.is_set():
            try:
                self.beat()
            except RedisError:
                pass
            self._stop.wait(ALIVE_TTL_S / 3)

    def put(self, event: dict[str, Any]) -> None:
        """Append ``event`` to the Redis list; raises EventsFull at MASKINV_WEBHOOK_QUEUE events waiting."""
        if self.connection.llen(self.events_key) >= self.capacity:
            self.connection.hincrby(self.counts_key, "refused", 1)
            raise EventsFull()
        pipe = self.connection.pipeline()
        pipe.lpush(self.events_key, json.dumps(event, separators=(",", ":")))
        pipe.hincrby(self.counts_key, "queued", 1)
        pipe.execute()

    def beat(self) -> None:
        self.connection.set(self._alive_prefix + self.consumer, "1", ex=ALIVE_TTL_S)

    def recover(self) -> int:
        """Put the events of dead consumers back at the head of the queue; how many."""
        moved = 0
        for key in self.connection.scan_iter(match=self._taken_prefix + "*", count=100):
            name = key.decode() if isinstance(key, bytes) else str(key)
            owner = name[len(self._taken_prefix):]
            if owner == self.consumer or self.connection.exists(self._alive_prefix + owner):
                continue
            while self.connection.lmove(name, self.events_key, "LEFT", "RIGHT") is not None:
                moved += 1
        if moved:
            log.info("webhook events of a stopped backend put back: %d", moved)
        return moved

    def step(self, wait_s: float = POLL_S) -> bool:
        """Take one event (waiting up to ``wait_s``), handle it and count its outcome; False when none came."""
        taken = self._taken_prefix + self.consumer
        raw = self._blocking.blmove(self.events_key, taken, max(1, int(wait_s)), "RIGHT", "LEFT")
        if raw is None:
            return False
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        name = outcome_of(self.handle, event) if isinstance(event, dict) else "failed"
        pipe = self.connection.pipeline()
        pipe.lrem(taken, 1, raw)
        pipe.hincrby(self.counts_key, name, 1)
        pipe.execute()
        return True

    def _loop(self) -> None:
        recovered_at, failing = 0.0, False
        while not self._stop.is_set():
            try:
                if time.monotonic() - recovered_at >= POLL_S:
                    self.recover()
                    recovered_at = time.monotonic()
                self.step()
                failing = False
            except RedisError as exc:
                (log.debug if failing else log.warning)("webhook queue: Redis unreachable (%s); retrying every %gs",
                                                        exc, POLL_S)
                failing = True
                self._stop.wait(POLL_S)

    def stop(self) -> None:
        self._stop.set()

    def counts(self) -> dict[str, int]:
        raw = self.connection.hgetall(self.counts_key)
        out = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
        out["pending"] = int(self.connection.llen(self.events_key))
        return out


def blocking_connection(connection: Any, socket_timeout_s: float) -> Any:
    """A client on its own pool to the same server as ``connection``, whose read timeout outlasts a blocking
    ``BLMOVE`` (``connection`` may have a shorter one, and a blocked call would hold one of its pooled
    connections); ``connection`` itself when it is not a redis-py client (tests' fakes)."""
    pool = getattr(connection, "connection_pool", None)
    if not isinstance(pool, ConnectionPool):
        return connection
    kwargs = {**pool.connection_kwargs, "socket_timeout": socket_timeout_s}
    return Redis(connection_pool=ConnectionPool(connection_class=pool.connection_class, **kwargs))
