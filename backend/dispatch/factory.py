"""The dispatcher the settings ask for: embedded (no ``REDIS_URL``) or queue mode."""

from __future__ import annotations

from backend.dispatch.base import Dispatcher
from backend.dispatch.embedded import EmbeddedDispatcher
from backend.dispatch.queue import QueueDispatcher
from backend.settings import Settings


def make_dispatcher(settings: Settings) -> Dispatcher:
    """An :class:`EmbeddedDispatcher` when ``settings.embedded``, else a :class:`QueueDispatcher`."""
    return EmbeddedDispatcher(settings) if settings.embedded else QueueDispatcher(settings)
