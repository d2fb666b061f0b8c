"""The images of a /predict request: fetched a few at a time, all by the request's deadline, and size-checked."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from backend.images.fetch import ImageError, ImageFetcher, image_size
from backend.labelstudio.regions import Region
from backend.predict.plan import TaskPlan

log = logging.getLogger(__name__)

#: images of one request fetched at the same time
FETCH_THREADS = 4


@dataclass
class ImageFetch:
    """One image to fetch for a group of regions of a task (filled in by :func:`fetch_all`)."""

    plan: TaskPlan
    url: Any
    task_id: Any
    vocab: tuple[str, ...]
    regions: list[Region]
    blob: bytes = b""
    size: tuple[int, int] = (0, 0)  # (width, height) once fetched
    error: str | None = None
    upstream: bool = False  # the error is the image host's fault (HTTP 502), not the request's (422)

    @property
    def error_kind(self) -> str:
        """The error entry's kind: "image" (the host failed) or "source" (a refused or unusable image)."""
        return "image" if self.upstream else "source"


def fetch_all(fetcher: ImageFetcher, fetches: list[ImageFetch], deadline: float, max_pixels: int,
              setup_fallbacks: tuple[str | None, str | None]) -> None:
    """Fetch every image, a few at a time, all by ``deadline`` (``time.monotonic()``); an image over
    ``max_pixels`` (MASKINV_MAX_IMAGE_PIXELS) is that fetch's error. ``setup_fallbacks``: /setup's hostname and
    token."""
    if not fetches:
        return
    hostname, fallback_token = setup_fallbacks

    def one(f: ImageFetch) -> None:
        try:
            blob = fetcher.fetch(f.url, f.task_id, hostname, fallback_token, deadline=deadline)
            w, h = image_size(blob)
            if w * h > max_pixels:
                raise ImageError(f"image is {w}x{h} pixels, more than the limit of {max_pixels} "
                                 "(MASKINV_MAX_IMAGE_PIXELS)")
            f.blob, f.size = blob, (w, h)
        except ImageError as exc:
            f.error, f.upstream = str(exc), exc.upstream
        except Exception as exc:  # noqa: BLE001 - reported for this task only, never as a 500
            log.exception("fetching %s failed", str(f.url)[:200])
            f.error, f.upstream = f"cannot fetch image: {exc.__class__.__name__}: {exc}", True

    if len(fetches) == 1:
        one(fetches[0])
        return
    pool = ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(fetches)), thread_name_prefix="maskinv-fetch")
    futures = {pool.submit(one, f): f for f in fetches}
    done, _ = wait(futures, timeout=max(0.0, deadline - time.monotonic()) + 1.0)
    pool.shutdown(wait=False, cancel_futures=True)
    for fut, f in futures.items():
        if fut not in done:
            f.error = "the image was not fetched before the request deadline (MASKINV_TIMEOUT/MASKINV_BATCH_TIMEOUT)"
            f.upstream = True
