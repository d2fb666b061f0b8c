"""Project runs: their status records (listed by ``GET /runs``) and the per-task claims that keep two runs from
writing the same task's prediction.

A *run* labels many tasks in the background and writes their predictions into Label Studio through its API:
``maskinv-annotate`` (backend.annotate_cli) or the rest of a Data Manager *Retrieve predictions* request that
would overrun MASKINV_BATCH_TIMEOUT (backend.background).

Storage: Redis in queue mode (so every web worker process, and a ``maskinv-annotate`` on another machine, sees
the same runs), process memory in embedded mode. Keys (``{prefix}`` = MASKINV_REDIS_PREFIX)::

    {prefix}:runs                   hash    run id -> RunStatus JSON (the newest MAX_RUNS are kept)
    {prefix}:run-alive:{run id}     string  set with a TTL of ALIVE_TTL_S, renewed by the run's heartbeat
    {prefix}:claim:{digest}         string  run id that is labelling one task for one model version
    {prefix}:written:{digest}       string  run id that wrote that prediction (TTL WRITTEN_TTL_S)
    {prefix}:run-resume:{run id}    string  what a background run needs to be resumed (ResumeRecord JSON), kept
                                            while it runs (TTL: the claims'); taken by one process at most

A claim whose run is no longer alive (killed, crashed) can be taken over at once, so a killed run never blocks
a re-run; a live run's claim is respected (the task is deferred and retried when the claim is released).
A background run whose process died leaves its resume record behind: the next backend that starts resumes it
(backend.background.resume_interrupted).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from worker.protocol import sha256_hex

#: seconds a run counts as alive after its last heartbeat
ALIVE_TTL_S = 15
#: seconds between two heartbeats of a run
HEARTBEAT_S = 5.0
#: run records kept (oldest dropped first)
MAX_RUNS = 200
#: seconds a written task is remembered (see RunStore.mark_written)
WRITTEN_TTL_S = 3600
#: written tasks remembered in memory (embedded mode)
MAX_WRITTEN = 100_000
#: failure reasons kept in a run record (the CLI prints all of them; the record shows the newest)
MAX_FAILURES_KEPT = 50

STATES = ("running", "done", "failed", "interrupted")


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
    proposed: int = 0  # of those, regions proposed for tasks without regions (backend.propose)
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)  # newest MAX_FAILURES_KEPT {"task", "reason"}
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        return [s.public(self.alive(s.id)) for s in items]


@dataclass(frozen=True)
class ResumeRecord:
    """What a background run of *Retrieve predictions* needs to be started again after its process died: the
    request's label config and ``params.maskinv``, the model version it writes, the Label Studio it writes to and
    the ids of its tasks (tasks already predicted with that version are skipped when it resumes)."""

    label_studio_url: str
    project: str | None
    label_config: str
    overrides: Any
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

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, Any]] = {}
        self._alive: dict[str, float] = {}
        self._claims: dict[str, str] = {}
        self._written: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._resume: dict[str, ResumeRecord] = {}
        self._lock = threading.Lock()

    def save(self, status: RunStatus) -> None:
        with self._lock:
            self._runs[status.id] = status.to_dict()
            while len(self._runs) > MAX_RUNS:
                oldest = min(self._runs, key=lambda k: self._runs[k]["started_at"])
                del self._runs[oldest]

    def load_all(self) -> list[RunStatus]:
        with self._lock:
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
        with self._lock:
            self._written[key] = (run_id, time.monotonic() + WRITTEN_TTL_S)
            self._written.move_to_end(key)
            while len(self._written) > MAX_WRITTEN:
                self._written.popitem(last=False)

    def written_by(self, key: str) -> str | None:
        with self._lock:
            hit = self._written.get(key)
            return hit[0] if hit is not None and hit[1] > time.monotonic() else None

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

    def __init__(self, connection: Any, prefix: str = "maskinv", claim_ttl_s: int = 24 * 3600):
        self.connection = connection
        self.prefix = prefix
        self.claim_ttl_s = int(claim_ttl_s)
        self.runs_key = f"{prefix}:runs"
        self._claim = connection.register_script(_CLAIM_LUA)
        self._release = connection.register_script(_RELEASE_LUA)

    def _alive_key(self, run_id: str) -> str:
        return f"{self.prefix}:run-alive:{run_id}"

    def _claim_key(self, key: str) -> str:
        return f"{self.prefix}:claim:{key}"

    def save(self, status: RunStatus) -> None:
        self.connection.hset(self.runs_key, status.id, json.dumps(status.to_dict()))

    def trim(self) -> None:
        """Keep the newest MAX_RUNS records."""
        raw = self.connection.hgetall(self.runs_key)
        if len(raw) <= MAX_RUNS:
            return
        started = []
        for k, v in raw.items():
            try:
                started.append((float(json.loads(v).get("started_at") or 0), k))
            except (ValueError, AttributeError):
                started.append((0.0, k))
        started.sort()
        self.connection.hdel(self.runs_key, *[k for _, k in started[: len(raw) - MAX_RUNS]])

    def load_all(self) -> list[RunStatus]:
        out = []
        for raw in self.connection.hvals(self.runs_key):
            try:
                out.append(RunStatus.from_dict(json.loads(raw)))
            except (ValueError, TypeError):
                continue  # a record written by something else: not ours to show
        return out

    def beat(self, run_id: str) -> None:
        self.connection.set(self._alive_key(run_id), "1", ex=ALIVE_TTL_S)

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


class Heartbeat:
    """Renews a run's liveness every HEARTBEAT_S seconds in a daemon thread (and saves its status)."""

    def __init__(self, store: RunStore, run_id: str, on_beat=None):
        self.store = store
        self.run_id = run_id
        self.on_beat = on_beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"maskinv-run-{run_id[-8:]}", daemon=True)

    def start(self) -> "Heartbeat":
        self.store.beat(self.run_id)
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
