"""Project runs: their status records (listed by ``GET /runs``) and the per-task claims that keep two runs from
writing the same task's prediction.

A *run* labels many tasks in the background and writes their predictions into Label Studio through its API:
``maskinv-annotate`` (backend.cli.annotate) or the rest of a Data Manager *Retrieve predictions* request that
would overrun MASKINV_BATCH_TIMEOUT (backend.runs.background).

Storage: Redis in queue mode (so every web worker process, and a ``maskinv-annotate`` on another machine, sees
the same runs), process memory in embedded mode. Keys (``{prefix}`` = MASKINV_REDIS_PREFIX)::

    {prefix}:runs                   hash    run id -> RunStatus JSON (at most MASKINV_MAX_RUN_RECORDS, oldest
                                            finished dropped first; a record expires RECORD_TTL_S after its last
                                            update, the hash RECORD_TTL_S after the last save)
    {prefix}:run-alive:{run id}     string  set with a TTL of ALIVE_TTL_S, renewed by the run's heartbeat
    {prefix}:claim:{digest}         string  run id that is labelling one task for one model version
    {prefix}:written:{digest}       string  run id that wrote that prediction (TTL WRITTEN_TTL_S)
    {prefix}:run-resume:{run id}    string  what a background run needs to be resumed (ResumeRecord JSON: Label
                                            Studio URL, project id, model version, task ids; nothing the request
                                            sent beyond them), kept while it runs (TTL: the claims'); taken by
                                            one process at most

Records are saved by this process first in memory: while Redis is unreachable the newest record of each run
stays there (``GET /runs`` shows it) and is written again once Redis answers. What a record echoes (failure
reasons, messages) carries no URL query string, fragment or userinfo (:func:`redact_urls`: signed URLs, tokens).

A claim whose run is no longer alive (killed, crashed) can be taken over at once, so a killed run never blocks
a re-run; a live run's claim is respected (the task is deferred and retried when the claim is released).
A background run whose process died leaves its resume record behind: the next backend that starts resumes it
(backend.runs.background.resume_interrupted).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from worker.protocol import sha256_hex

from backend.bounded_cache import BoundedCache

#: seconds a run counts as alive after its last heartbeat
ALIVE_TTL_S = 15
#: seconds between two heartbeats of a run
HEARTBEAT_S = 5.0
#: run records kept by default (MASKINV_MAX_RUN_RECORDS; oldest finished dropped first)
MAX_RUNS = 200
#: seconds a run record is kept after its last update (finished runs; a live run updates it every HEARTBEAT_S)
RECORD_TTL_S = 7 * 24 * 3600
#: seconds a written task is remembered (see RunStore.mark_written)
WRITTEN_TTL_S = 3600
#: written tasks remembered in memory (embedded mode)
MAX_WRITTEN = 100_000
#: failure reasons kept in a run record (the CLI prints all of them; the record shows the newest)
MAX_FAILURES_KEPT = 50

STATES = ("running", "done", "failed", "interrupted")

log = logging.getLogger(__name__)

#: an absolute URL (scheme://...) or a server path with a query (/data/upload/1/x.png?token=...)
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>]+|(?<![\w/:])/[^\s'"<>?#]*[?#][^\s'"<>]*""")


def _strip_url(url: str) -> str:
    """``url`` without userinfo, query and fragment (trailing punctuation of the sentence kept)."""
    tail = ""
    while url and url[-1] in ".,;)]":
        url, tail = url[:-1], url[-1] + tail
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + tail
    except ValueError:  # unparseable (a bad port, brackets): keep only what precedes any query or userinfo
        return re.split(r"[?#@]", url, maxsplit=1)[0] + tail


def redact_urls(text: str) -> str:
    """``text`` with every URL in it stripped of userinfo, query string and fragment (signed URLs, tokens)."""
    return _URL.sub(lambda m: _strip_url(m.group(0)), text)


def new_run_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


@dataclass
class RunStatus:
    """Progress of one run. Counts are tasks: ``queued + running + done + skipped + failed == total``."""

    id: str
    kind: str  # "annotate" (maskinv-annotate) | "retrieve" (rest of a Retrieve predictions request)
    project: str | None
    model_version: str
    state: str = "running"
    total: int = 0
    queued: int = 0
    running: int = 0
    done: int = 0  # a prediction was written
    skipped: int = 0  # already predicted, no regions (or none proposed), or failed before (without --retry-failed)
    failed: int = 0
    regions: int = 0  # regions labelled (in written predictions)
    proposed: int = 0  # of those, regions proposed for tasks without regions (backend.predict.propose)
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)  # newest MAX_FAILURES_KEPT {"task", "reason"}
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as stored and shown: failure reasons and the message with URLs redacted."""
        out = asdict(self)
        out["failures"] = [{**f, "reason": redact_urls(str(f.get("reason") or ""))} if isinstance(f, dict) else f
                           for f in out["failures"]]
        if out["message"]:
            out["message"] = redact_urls(str(out["message"]))
        return out

    def last_change(self) -> float:
        """When the record last changed (epoch seconds)."""
        return float(self.finished_at or self.updated_at or self.started_at or 0.0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunStatus":
        if not isinstance(data, Mapping) or not isinstance(data.get("id"), str):
            raise ValueError("a run status needs an 'id'")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def public(self, alive: bool) -> dict[str, Any]:
        """What ``GET /runs`` answers: a run that says it is running but stopped beating is ``interrupted``."""
        out = self.to_dict()
        if self.state == "running" and not alive:
            out["state"] = "interrupted"
        end = self.finished_at or (self.updated_at if out["state"] != "running" else time.time())
        elapsed = end - self.started_at
        out["elapsed_s"] = round(max(0.0, elapsed), 3)
        return out


class RunStore:
    """Run records, liveness and task claims. Subclasses: :class:`MemoryRunStore`, :class:`RedisRunStore`."""

    def save(self, status: RunStatus) -> None:
        raise NotImplementedError

    def load_all(self) -> list[RunStatus]:
        raise NotImplementedError

    def beat(self, run_id: str) -> None:
        raise NotImplementedError

    def alive(self, run_id: str) -> bool:
        raise NotImplementedError

    def end(self, run_id: str) -> None:
        """The run finished: it is no longer alive (its claims can be taken over)."""
        raise NotImplementedError

    def claim(self, run_id: str, key: str) -> str | None:
        """Claim ``key`` for ``run_id``; returns None on success, else the live run that holds it."""
        raise NotImplementedError

    def release(self, run_id: str, key: str) -> None:
        raise NotImplementedError

    def holder(self, key: str) -> str | None:
        """The live run holding ``key``, if any."""
        raise NotImplementedError

    def mark_written(self, run_id: str, key: str) -> None:
        """``run_id`` wrote the prediction of ``key`` (remembered WRITTEN_TTL_S: closes the gap between Label
        Studio choosing the tasks of a Retrieve predictions and the backend seeing them)."""
        raise NotImplementedError

    def written_by(self, key: str) -> str | None:
        raise NotImplementedError

    def keep_for_resume(self, run_id: str, record: "ResumeRecord") -> None:
        """Keep what is needed to resume ``run_id`` should its process die (until :meth:`forget_resume`)."""
        raise NotImplementedError

    def forget_resume(self, run_id: str) -> None:
        raise NotImplementedError

    def resumable(self) -> list[str]:
        """Runs with a resume record that are no longer alive (their process died mid-run)."""
        raise NotImplementedError

    def take_resume(self, run_id: str) -> "ResumeRecord | None":
        """Remove and return ``run_id``'s resume record; None when another process took it first (or none is
        left). At most one caller gets a record."""
        raise NotImplementedError

    def runs(self) -> list[dict[str, Any]]:
        """Every kept run, newest first, as ``GET /runs`` shows it."""
        items = sorted(self.load_all(), key=lambda s: s.started_at, reverse=True)
        return [s.public(self._alive_or_running(s)) for s in items]

    def _alive_or_running(self, status: RunStatus) -> bool:
        try:
            return self.alive(status.id)
        except Exception:  # noqa: BLE001 - the store is unreachable: show the state the record says
            return status.state == "running"


def records_to_drop(records: Iterable[RunStatus], max_records: int, now: float | None = None) -> list[str]:
    """Ids of the records to drop: those unchanged for RECORD_TTL_S, then beyond ``max_records`` the oldest
    finished first (by last change), then the oldest started."""
    now = time.time() if now is None else now
    keep: list[RunStatus] = []
    drop: list[RunStatus] = []
    for s in records:
        (drop if s.last_change() < now - RECORD_TTL_S else keep).append(s)
    over = len(keep) - max_records
    if over > 0:
        keep.sort(key=lambda s: (s.state == "running", s.last_change() if s.state != "running" else s.started_at))
        drop.extend(keep[:over])
    return [s.id for s in drop]


@dataclass(frozen=True)
class ResumeRecord:
    """What a background run of *Retrieve predictions* needs to be started again after its process died: the
    Label Studio it writes to, the project, the model version it writes and the ids of its tasks. Nothing else
    of the request travels: the resumed run re-reads the project's label config and each task from Label Studio
    (tasks of other projects are not written; tasks already predicted with that version are skipped)."""

    label_studio_url: str
    project: str | None
    model_version: str
    task_ids: tuple[Any, ...]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "task_ids": list(self.task_ids)})

    @classmethod
    def from_json(cls, raw: str | bytes) -> "ResumeRecord":
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("task_ids"), list):
            raise ValueError("a resume record needs 'task_ids'")
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "task_ids": tuple(data["task_ids"])})


def claim_key(label_studio_url: str | None, task_id: Any, model_version: str) -> str:
    """The claim of one task (of one Label Studio) for one model version."""
    return sha256_hex(f"{label_studio_url or ''}\n{task_id}\n{model_version}".encode())[:32]


class MemoryRunStore(RunStore):
    """Runs of this process (embedded mode)."""

    def __init__(self, max_records: int = MAX_RUNS) -> None:
        self.max_records = int(max_records)
        self._runs: dict[str, dict[str, Any]] = {}
        self._alive: dict[str, float] = {}
        self._claims: dict[str, str] = {}
        # claim key -> run id that wrote the task, for WRITTEN_TTL_S seconds
        self._written: BoundedCache[str, str] = BoundedCache(MAX_WRITTEN, ttl_s=WRITTEN_TTL_S)
        self._resume: dict[str, ResumeRecord] = {}
        self._lock = threading.Lock()

    def save(self, status: RunStatus) -> None:
        with self._lock:
            self._runs[status.id] = status.to_dict()
            self._trim()

    def _trim(self) -> None:
        for run_id in records_to_drop((RunStatus.from_dict(d) for d in self._runs.values()), self.max_records):
            del self._runs[run_id]

    def load_all(self) -> list[RunStatus]:
        with self._lock:
            self._trim()
            return [RunStatus.from_dict(d) for d in self._runs.values()]

    def beat(self, run_id: str) -> None:
        with self._lock:
            self._alive[run_id] = time.monotonic() + ALIVE_TTL_S

    def alive(self, run_id: str) -> bool:
        with self._lock:
            return self._alive.get(run_id, 0.0) > time.monotonic()

    def end(self, run_id: str) -> None:
        with self._lock:
            self._alive.pop(run_id, None)

    def claim(self, run_id: str, key: str) -> str | None:
        with self._lock:
            cur = self._claims.get(key)
            if cur is not None and cur != run_id and self._alive.get(cur, 0.0) > time.monotonic():
                return cur
            self._claims[key] = run_id
            return None

    def release(self, run_id: str, key: str) -> None:
        with self._lock:
            if self._claims.get(key) == run_id:
                del self._claims[key]

    def holder(self, key: str) -> str | None:
        with self._lock:
            cur = self._claims.get(key)
            return cur if cur is not None and self._alive.get(cur, 0.0) > time.monotonic() else None

    def mark_written(self, run_id: str, key: str) -> None:
        self._written.put(key, run_id)

    def written_by(self, key: str) -> str | None:
        return self._written.get(key)

    def keep_for_resume(self, run_id: str, record: ResumeRecord) -> None:
        with self._lock:
            self._resume[run_id] = record

    def forget_resume(self, run_id: str) -> None:
        with self._lock:
            self._resume.pop(run_id, None)

    def resumable(self) -> list[str]:
        with self._lock:
            now = time.monotonic()
            return [r for r in self._resume if self._alive.get(r, 0.0) <= now]

    def take_resume(self, run_id: str) -> ResumeRecord | None:
        with self._lock:
            return self._resume.pop(run_id, None)


#: atomically take a claim that is free, ours, or held by a run that is no longer alive
_CLAIM_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. cur) == 1 then
  return cur
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisRunStore(RunStore):
    """Runs shared through Redis (queue mode; also used by ``maskinv-annotate`` when REDIS_URL is set)."""

    def __init__(self, connection: Any, prefix: str = "maskinv", claim_ttl_s: int = 24 * 3600,
                 max_records: int = MAX_RUNS):
        self.connection = connection
        self.prefix = prefix
        self.claim_ttl_s = int(claim_ttl_s)
        self.max_records = int(max_records)
        self.runs_key = f"{prefix}:runs"
        #: records not yet written (Redis unreachable): run id -> newest record, written again by flush()
        self._pending: OrderedDict[str, RunStatus] = OrderedDict()
        self._pending_lock = threading.Lock()
        self._seen: set[str] = set()  # run ids written by this store (a new one trims the hash)
        self._claim = connection.register_script(_CLAIM_LUA)
        self._release = connection.register_script(_RELEASE_LUA)

    def _alive_key(self, run_id: str) -> str:
        return f"{self.prefix}:run-alive:{run_id}"

    def _claim_key(self, key: str) -> str:
        return f"{self.prefix}:claim:{key}"

    def save(self, status: RunStatus) -> None:
        """Write ``status`` (and any record an outage held back); while Redis is unreachable it is kept in
        memory and written by the next save, heartbeat or listing that reaches Redis."""
        with self._pending_lock:
            self._pending[status.id] = RunStatus.from_dict(status.to_dict())
            self._pending.move_to_end(status.id)
            while len(self._pending) > self.max_records:
                self._pending.popitem(last=False)
        self.flush()

    def flush(self) -> bool:
        """Write the records held back; False when Redis is still unreachable (they stay held)."""
        with self._pending_lock:
            todo = list(self._pending.values())
        if not todo:
            return True
        try:
            pipe = self.connection.pipeline(transaction=False)
            pipe.hset(self.runs_key, mapping={st.id: json.dumps(st.to_dict()) for st in todo})
            pipe.expire(self.runs_key, RECORD_TTL_S)
            pipe.execute()
        except redis_errors() as exc:
            log.warning("run records: Redis is unreachable (%s); %d record(s) kept in memory until it is back",
                        exc, len(todo))
            return False
        with self._pending_lock:
            for st in todo:
                if self._pending.get(st.id) is st:  # not replaced by a newer record meanwhile
                    del self._pending[st.id]
        fresh = {st.id for st in todo} - self._seen
        self._seen |= fresh
        if fresh or any(st.state != "running" for st in todo):  # a new or a finished record: trim
            if len(self._seen) > 4 * self.max_records:
                self._seen = {st.id for st in todo}
            self.trim()
        return True

    def trim(self) -> None:
        """Drop expired records and, beyond ``max_records``, the oldest finished ones first."""
        raw = self.connection.hgetall(self.runs_key)
        parsed, junk = [], []
        for k, v in raw.items():
            try:
                parsed.append(RunStatus.from_dict(json.loads(v)))
            except (ValueError, TypeError):
                junk.append(k)  # a record written by something else: not ours to keep
        drop = junk + records_to_drop(parsed, self.max_records)
        if drop:
            self.connection.hdel(self.runs_key, *drop)

    def load_all(self) -> list[RunStatus]:
        """The kept records (held-back ones included); only those held in memory while Redis is unreachable."""
        self.flush()
        with self._pending_lock:
            held = {k: v for k, v in self._pending.items()}
        try:
            raws = self.connection.hvals(self.runs_key)
        except redis_errors():
            return list(held.values())
        out: dict[str, RunStatus] = {}
        for raw in raws:
            try:
                st = RunStatus.from_dict(json.loads(raw))
            except (ValueError, TypeError):
                continue  # a record written by something else: not ours to show
            out[st.id] = st
        out.update(held)
        expired = set(records_to_drop(out.values(), len(out) + 1))
        return [st for k, st in out.items() if k not in expired]

    def beat(self, run_id: str) -> None:
        self.connection.set(self._alive_key(run_id), "1", ex=ALIVE_TTL_S)
        self.flush()

    def alive(self, run_id: str) -> bool:
        return bool(self.connection.exists(self._alive_key(run_id)))

    def end(self, run_id: str) -> None:
        self.connection.delete(self._alive_key(run_id))

    def claim(self, run_id: str, key: str) -> str | None:
        cur = self._claim(keys=[self._claim_key(key)], args=[run_id, self.claim_ttl_s, f"{self.prefix}:run-alive:"])
        if cur is None:
            return None
        return cur.decode() if isinstance(cur, bytes) else str(cur)

    def release(self, run_id: str, key: str) -> None:
        self._release(keys=[self._claim_key(key)], args=[run_id])

    def holder(self, key: str) -> str | None:
        cur = self.connection.get(self._claim_key(key))
        if cur is None:
            return None
        cur = cur.decode() if isinstance(cur, bytes) else str(cur)
        return cur if self.alive(cur) else None

    def mark_written(self, run_id: str, key: str) -> None:
        self.connection.set(f"{self.prefix}:written:{key}", run_id, ex=WRITTEN_TTL_S)

    def written_by(self, key: str) -> str | None:
        cur = self.connection.get(f"{self.prefix}:written:{key}")
        return None if cur is None else (cur.decode() if isinstance(cur, bytes) else str(cur))

    def _resume_key(self, run_id: str) -> str:
        return f"{self.prefix}:run-resume:{run_id}"

    def keep_for_resume(self, run_id: str, record: ResumeRecord) -> None:
        self.connection.set(self._resume_key(run_id), record.to_json(), ex=self.claim_ttl_s)

    def forget_resume(self, run_id: str) -> None:
        self.connection.delete(self._resume_key(run_id))

    def resumable(self) -> list[str]:
        head = f"{self.prefix}:run-resume:"
        out = []
        for key in self.connection.scan_iter(match=f"{head}*", count=200):
            run_id = (key.decode() if isinstance(key, bytes) else str(key))[len(head):]
            if not self.alive(run_id):
                out.append(run_id)
        return out

    def take_resume(self, run_id: str) -> ResumeRecord | None:
        raw = self.connection.getdel(self._resume_key(run_id))  # atomic: one process gets it
        if raw is None:
            return None
        try:
            return ResumeRecord.from_json(raw)
        except (ValueError, TypeError):
            return None  # not ours to resume


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis outage raises: redis' connection and timeout errors (RedisError) and Python's own
    ConnectionError / TimeoutError (the queue dispatcher's QueueUnavailable is a ConnectionError)."""
    from redis.exceptions import RedisError

    return RedisError, ConnectionError, TimeoutError


class Heartbeat:
    """Renews a run's liveness every HEARTBEAT_S seconds in a daemon thread (and saves its status)."""

    def __init__(self, store: RunStore, run_id: str, on_beat=None):
        self.store = store
        self.run_id = run_id
        self.on_beat = on_beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"maskinv-run-{run_id[-8:]}", daemon=True)

    def start(self) -> "Heartbeat":
        try:
            self.store.beat(self.run_id)
        except Exception as exc:  # noqa: BLE001 - a store outage: the loop beats again every HEARTBEAT_S
            log.warning("run %s: first heartbeat failed: %s", self.run_id, exc)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.beat(self.run_id)
                if self.on_beat is not None:
                    self.on_beat()
            except Exception:  # noqa: BLE001 - a transient Redis error: beat again next time
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=HEARTBEAT_S + 1)
        try:
            self.store.end(self.run_id)
        except Exception:  # noqa: BLE001 - the alive key expires by itself
            pass
