"""What the queue carries: the job kinds, the functions and callbacks a worker may run, and their JSON serializer.

Names enqueued by the previous release (:data:`FORMER_FUNCTIONS`, :data:`FORMER_CALLBACKS`) still run for one
release: the queue worker maps them to today's names (:func:`runnable_function`) before RQ imports anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.protocol.errors import ProtocolError


@dataclass(frozen=True)
class JobKind:
    """One kind of job: its short name and the dotted path of the plain function a worker runs."""

    name: str
    function: str
    description: str


#: every job a worker runs, by short name (add a kind here and in worker.jobs.regions; nothing else is needed)
JOB_KINDS: dict[str, JobKind] = {
    "label_regions": JobKind("label_regions", "worker.jobs.regions.label_regions",
                             "label and caption every region of one image"),
    "prepare_labels": JobKind("prepare_labels", "worker.jobs.regions.prepare_labels",
                              "build and cache the text prototypes (and caption phrases) of a project's label sets"),
    "embed_regions": JobKind("embed_regions", "worker.jobs.embed.embed_regions",
                             "the LETs of regions of one image (examples), and text prototypes of labels"),
    "propose_regions": JobKind("propose_regions", "worker.jobs.propose.propose_regions",
                               "propose, label and caption regions nobody drew on one image"),
    "warm_up": JobKind("warm_up", "worker.jobs.runtime.warm_up", "load the model; answers the model's identity"),
}

#: RQ success callback that stores a finished job's region results in the result cache
STORE_CALLBACK = "worker.jobs.store_result.store_job_result"

#: job functions as the previous release enqueued them -> today's name (kept for one release)
FORMER_FUNCTIONS: dict[str, str] = {
    "worker.jobs.label_regions": JOB_KINDS["label_regions"].function,
    "worker.jobs.prepare_labels": JOB_KINDS["prepare_labels"].function,
    "worker.embed_jobs.embed_regions": JOB_KINDS["embed_regions"].function,
    "worker.proposal_jobs.propose_regions": JOB_KINDS["propose_regions"].function,
}
#: callbacks as the previous release enqueued them -> today's name (kept for one release)
FORMER_CALLBACKS: dict[str, str] = {"worker.result_cache.store_job_result": STORE_CALLBACK}


def job_function(kind: str) -> str:
    """The dotted function name of job kind ``kind``; ProtocolError for an unknown kind."""
    try:
        return JOB_KINDS[kind].function
    except KeyError:
        raise ProtocolError(f"unknown job kind {kind!r}; known: {sorted(JOB_KINDS)}") from None


def allowed_functions() -> frozenset[str]:
    """The functions a worker may run (anything else enqueued on its queue fails without being imported)."""
    return frozenset(k.function for k in JOB_KINDS.values())


def allowed_callbacks() -> frozenset[str]:
    """The job callbacks a worker may run (others are ignored)."""
    return frozenset({STORE_CALLBACK})


def runnable_function(name: str | None) -> str | None:
    """Today's dotted name of an enqueued job function (a former name mapped), or None when it is not allowed."""
    if name is None:
        return None
    name = FORMER_FUNCTIONS.get(name, name)
    return name if name in allowed_functions() else None


def runnable_callback(name: str | None) -> str | None:
    """Today's dotted name of an enqueued job callback (a former name mapped), or None when it is not allowed."""
    if name is None:
        return None
    name = FORMER_CALLBACKS.get(name, name)
    return name if name in allowed_callbacks() else None


def job_serializer() -> Any:
    """RQ's JSON serializer: job data and results on the queue (backend and worker must agree); never pickle."""
    from rq.serializers import JSONSerializer

    return JSONSerializer
