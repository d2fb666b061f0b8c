"""Label Studio ML backend for MaskInversion (HTTP side; never imports torch in queue mode).

Entry points: ``maskinv-backend`` / ``python -m backend`` (gunicorn, :mod:`backend.http.serve`) and
:func:`backend.http.app.create_app` (the WSGI app).
"""
