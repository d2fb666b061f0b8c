"""Label Studio ML backend for MaskInversion (HTTP side; never imports torch in queue mode).

Entry points: ``maskinv-backend`` / ``python -m backend`` (gunicorn, :mod:`backend.serve`) and
:func:`backend.app.create_app` (the WSGI app).
"""
