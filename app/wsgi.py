"""The web app as a WSGI import target (``app.wsgi:app``), for any WSGI server.

The web process itself (``rilla-bridge web``) serves it through granian's RSGI interface
(``app.rsgi``); the benchmarks also run it under gunicorn for comparison.
"""

from app import create_app

app = create_app()
