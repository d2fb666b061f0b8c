"""Per-request overrides in ``params.maskinv``: each documented one is accepted and validated like the others."""

from __future__ import annotations

import pytest

from backend_support import predict, rect, task


def _ask(client, **maskinv):
    return predict(client, "rectangle", [task(7)], context={"result": [rect("a1")]}, maskinv=maskinv)


def test_crop_weight_is_a_per_request_override_in_the_model_version(client):
    default = _ask(client)
    mixed = _ask(client, crop_weight=0.5)
    alone = _ask(client, crop_weight=0)
    for resp in (default, mixed, alone):
        assert resp.status_code == 200, resp.get_json()
    versions = {r.get_json()["results"][0]["model_version"] for r in (default, mixed, alone)}
    assert len(versions) == 3  # each weight is its own model version (and so its own cache entries)


@pytest.mark.parametrize("bad", [-0.1, 10.5, True, "0.5", None])
def test_a_bad_crop_weight_is_400_naming_it(client, bad):
    resp = _ask(client, crop_weight=bad)
    assert resp.status_code == 400 and "crop_weight" in resp.get_json()["error"], resp.get_json()
