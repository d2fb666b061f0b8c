"""Out of memory in a large batch of masks (embedded mode, tiny model): the engine halves its mask chunk and
retries, so every region is still labelled; an image whose single mask does not fit fails alone."""

from __future__ import annotations

import pytest
import torch

from backend_support import predict, rect, task

pytestmark = pytest.mark.faults

REGIONS = [rect(f"r{i}", x=5 + 12 * i, y=5 + 8 * i, w=25, h=30) for i in range(6)]


def answer(client, tasks, context=None):
    resp = predict(client, "rectangle", tasks, context=context)
    return resp.status_code, resp.get_json()


def by_id(pred) -> dict[str, tuple]:
    return {r["id"]: (r["value"]["rectanglelabels"], r["score"]) for r in pred["result"]
            if r["type"] == "rectanglelabels"}


def forget_lets() -> None:
    """Empty the embedded runtime's LET cache, so that the next job inverts its regions."""
    from worker.jobs import runtime as jobs
    from worker.jobs.let_cache import MemoryLetCache

    rt = jobs.get_runtime()
    s = rt.settings
    rt.let_cache = MemoryLetCache(s.let_cache_entries, s.let_cache_bytes, s.let_ttl_s)


@pytest.fixture
def oom_when(monkeypatch):
    """``oom_when(rule)``: decomposed LeGrad raises ``rule(n_masks, call_number)`` when that is an exception."""
    from worker.engine import legrad

    calls: list[int] = []
    real = legrad.decomposed_relevance

    def install(rule):
        def relevance(visual, state, emb, *args, **kwargs):
            calls.append(int(emb.shape[0]))
            error = rule(int(emb.shape[0]), len(calls))
            if error is not None:
                raise error
            return real(visual, state, emb, *args, **kwargs)
        monkeypatch.setattr(legrad, "decomposed_relevance", relevance)
        return calls
    return install


def test_cuda_oom_falls_back_to_smaller_chunks(make_client, oom_when):
    reference = answer(make_client(), [task(1, 5)], {"result": REGIONS})  # unpatched
    assert reference[0] == 200
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
    calls = oom_when(lambda n, _: oom if n > 1 else None)
    forget_lets()  # the LETs of these regions are cached apart from labels: invert them again
    status, body = answer(make_client(), [task(1, 5)], {"result": REGIONS})  # fresh result cache
    assert status == 200, body
    (pred,) = body["results"]
    assert pred["maskinv"]["errors"] == [] and pred["maskinv"]["labelled"] == len(REGIONS)
    assert max(calls) == len(REGIONS) and 1 in calls  # it did run out of memory, then went down to one mask
    got, want = by_id(pred), by_id(reference[1]["results"][0])
    assert got.keys() == want.keys()
    for rid in want:
        assert got[rid][0] == want[rid][0] and got[rid][1] == pytest.approx(want[rid][1], abs=1e-4)


def test_cpu_oom_falls_back_to_smaller_chunks(make_client, oom_when):
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 21474836480 bytes (simulated)")
    oom_when(lambda n, _: oom if n > 1 else None)
    status, body = answer(make_client(), [task(1, 6)], {"result": REGIONS})
    assert status == 200 and body["results"][0]["maskinv"]["labelled"] == len(REGIONS)


def test_an_image_whose_single_mask_does_not_fit_fails_alone(make_client, oom_when):
    """The first job runs out of memory even with one mask: that task gets an error, the next task (its own
    job, after it) is labelled."""
    oom = torch.OutOfMemoryError("CUDA out of memory (simulated)")
    oom_when(lambda n, call: oom if call == 1 else None)
    status, body = answer(make_client(), [task(1, 7, annotations=[{"id": 1, "result": [rect("big")]}]),
                                          task(2, 8, annotations=[{"id": 2, "result": [rect("small")]}])])
    assert status == 200, body
    big, small = body["results"]
    assert "result" not in big and "OutOfMemoryError" in big["error"]
    assert set(by_id(small)) == {"small"}
