"""The HTTP surface: the Flask app, Label Studio's model class and the gunicorn server."""
