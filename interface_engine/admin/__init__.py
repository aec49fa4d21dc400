"""The admin HTTP server: REST API, console pages, metrics and health checks (see server.py)."""
