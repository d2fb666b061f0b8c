"""backend.dispatch.embedded runs worker jobs by their allow-listed name only, resolved as RQ resolves it."""

from __future__ import annotations

import pytest

from backend.dispatch import DispatchError, EmbeddedDispatcher
from backend.dispatch.embedded import call_job
from backend.settings import Settings


@pytest.mark.parametrize("name", ["os.system", "worker.jobs.runtime.get_runtime", "builtins.eval", "warm_up"])
def test_names_outside_the_allow_list_are_refused_before_any_import(name):
    with pytest.raises(DispatchError, match="not in worker.protocol.JOB_KINDS"):
        call_job(name, {})


def test_run_jobs_refuses_an_unknown_function():
    d = EmbeddedDispatcher(Settings.from_env({}))
    with pytest.raises(DispatchError, match="not a worker job function"):
        d.run_jobs("os.system", [(b"", {})], 1.0)
