"""Running jobs: on RQ over Redis (queue) or in this process (embedded), with the result cache."""

from backend.dispatch.base import (QUEUE_UNAVAILABLE, Dispatcher, DispatchError, LabelOutcome, LabelRequest,
                                   PreparedJob, QueueUnavailable, RunResult)
from backend.dispatch.embedded import EmbeddedDispatcher
from backend.dispatch.factory import make_dispatcher
from backend.dispatch.queue import QueueDispatcher

__all__ = ["QUEUE_UNAVAILABLE", "Dispatcher", "DispatchError", "EmbeddedDispatcher", "LabelOutcome", "LabelRequest",
           "PreparedJob", "QueueDispatcher", "QueueUnavailable", "RunResult", "make_dispatcher"]
