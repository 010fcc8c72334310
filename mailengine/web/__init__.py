"""The web admin (/gui/admin), the HTTP API (/api/v1/) and Prometheus /metrics: server.py."""
