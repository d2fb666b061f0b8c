"""Backend settings from the environment: defaults, parsing, clear errors."""

from __future__ import annotations

import pytest

from backend.http.serve import gunicorn_options
from backend.settings import Settings, SettingsError
from worker.protocol import DEFAULT_TEMPLATES


def test_defaults():
    s = Settings.from_env({})
    assert s.embedded and s.port == 9090 and s.host == "0.0.0.0" and s.web_workers == 1 and s.queue == "maskinv"
    assert s.params.steps == 10 and s.params.size == 448 and s.params.top_k == 3 and s.params.alpha == 0.0
    assert s.params.templates == DEFAULT_TEMPLATES
    assert Settings.from_env({"REDIS_URL": "redis://r:6379/0"}).web_workers == 2  # queue mode: no model in web procs


def test_parsing():
    s = Settings.from_env({"MASKINV_STEPS": "20", "MASKINV_ALPHA": "0.5", "MASKINV_TOP_K": "5",
                           "MASKINV_TEMPLATES": '["a {}.", "the {}."]', "MASKINV_CAPTION": "false",
                           "MASKINV_LABELS": "cat, dog,,cat", "LABEL_STUDIO_URL": "http://ls:8080/",
                           "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p", "MASKINV_TIMEOUT": "2.5"})
    assert (s.params.steps, s.params.alpha, s.params.top_k, s.params.caption) == (20, 0.5, 5, False)
    assert s.params.templates == ("a {}.", "the {}.")
    assert s.extra_labels == ("cat", "dog") and s.label_studio_url == "http://ls:8080" and s.timeout_s == 2.5
    assert Settings.from_env({"MASKINV_TEMPLATES": "a {}.|an {}."}).params.templates == ("a {}.", "an {}.")
    opts = gunicorn_options(s)
    assert opts["bind"] == "0.0.0.0:9090" and opts["worker_class"] == "gthread" and opts["timeout"] > 90


@pytest.mark.parametrize("env, match", [
    ({"MASKINV_PORT": "abc"}, "MASKINV_PORT must be an integer"),
    ({"MASKINV_PORT": "70000"}, r"MASKINV_PORT must be in \[1, 65535\]"),
    ({"MASKINV_TIMEOUT": "soon"}, "MASKINV_TIMEOUT must be a number"),
    ({"MASKINV_CAPTION": "maybe"}, "MASKINV_CAPTION must be a boolean"),
    ({"MASKINV_STEPS": "5000"}, "params.steps"),
    ({"MASKINV_TEMPLATES": '["no placeholder"]'}, "MASKINV_TEMPLATES"),
    ({"BASIC_AUTH_USER": "u"}, "set together"),
    ({"LABEL_STUDIO_URL": "ls:8080"}, "must start with http"),
    ({"MASKINV_LOG_LEVEL": "LOUD"}, "MASKINV_LOG_LEVEL"),
    ({"MASKINV_EXAMPLE_VIEWS": "3"}, "MASKINV_EXAMPLE_VIEWS"),
    ({"MASKINV_EXAMPLE_VIEWS": "two"}, "MASKINV_EXAMPLE_VIEWS"),
])
def test_bad_values_name_the_variable(env, match):
    with pytest.raises(SettingsError, match=match):
        Settings.from_env(env)


def test_crop_weight_default_and_bounds():
    assert Settings.from_env({}).params.crop_weight == 0.3
    assert Settings.from_env({"MASKINV_CROP_WEIGHT": "0"}).params.crop_weight == 0.0
    assert "crop_weight" not in Settings.from_env({"MASKINV_CROP_WEIGHT": "0"}).params.to_dict()
    for bad in ("-1", "11", "nan", "heavy"):
        with pytest.raises(SettingsError, match="MASKINV_CROP_WEIGHT"):
            Settings.from_env({"MASKINV_CROP_WEIGHT": bad})


def test_model_version_changes_with_the_crop_weight(make_client):
    a = make_client(MASKINV_CROP_WEIGHT="0.3").get("/versions").get_json()
    b = make_client(MASKINV_CROP_WEIGHT="0").get("/versions").get_json()
    assert a and b and a != b
