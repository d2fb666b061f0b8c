"""The Label Studio ML model class (label-studio-ml 1.0.9's ``LabelStudioMLBase``)."""

from __future__ import annotations

import logging
from typing import Any

from backend.labelstudio.label_config import LabelConfigError, ProjectConfig
from backend.service import PredictError, Service
from backend.http.torchless import import_label_studio_ml

_, _ml_model = import_label_studio_ml()
#: label-studio-ml's model base class, imported without torch (backend.http.torchless)
LabelStudioMLBase: Any = _ml_model.LabelStudioMLBase

log = logging.getLogger(__name__)


class MaskInversionModel(LabelStudioMLBase):
    """Labels and captions the image regions of Label Studio tasks with MaskInversion.

    ``service`` (set by :func:`backend.http.app.create_app`) holds the process-wide dispatcher, image fetcher and
    config cache, so instances are cheap and can be made per request.
    """

    service: Service | None = None

    def __init__(self, label_config: str | None = None, train_output: Any = None, **kwargs: Any):
        # the base class would also parse the config with the legacy label_studio_tools parser; we use the SDK's
        super().__init__(label_config=None, train_output=train_output, **kwargs)
        self.label_config = label_config
        self._service = self._bound_service()
        self._config: ProjectConfig | None = None

    @classmethod
    def _bound_service(cls) -> Service:
        if cls.service is None:
            raise RuntimeError("MaskInversionModel.service is not set: "
                               "create the app with backend.http.app.create_app()")
        return cls.service

    @property
    def config(self) -> ProjectConfig:
        if self._config is None:
            if not self.label_config:
                raise PredictError(400, "the request has no label config")
            try:
                self._config = self._service.config(self.label_config)
            except LabelConfigError as exc:
                raise PredictError(400, f"label config: {exc}") from None
        return self._config

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> list[Any]:
        """One prediction per task; ``kwargs["maskinv"]`` may override inversion params and labels."""
        from backend.predict.tasks import predict_tasks

        return predict_tasks(self._service, self.config, tasks, context=context, overrides=kwargs.get("maskinv"),
                             project=getattr(self, "maskinv_project", None))

    def fit(self, *args: Any, **kwargs: Any) -> dict:
        """Not used: learning from annotations runs in the app's own ``/webhook`` and ``/train`` views
        (backend.learning.learner), which turn annotated regions into the project's examples."""
        return {}
