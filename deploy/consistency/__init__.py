"""The checks behind ``deploy/check_consistency.py``, split by what they read: ``common`` (how a container's
args parse, shared by all), ``kubernetes`` (the rendered overlays), ``compose`` (the compose files with
Prometheus and Grafana beside them)."""
