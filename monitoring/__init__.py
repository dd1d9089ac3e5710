"""Monitoring of imagine: the local Prometheus config (`prometheus.yml`), the alert rules (`alerts.yml`) with
their promtool unit tests (`tests/alerts_test.yml`), and the Grafana dashboards (`dashboards/*.json`, generated
by `dashboards.py`). `cluster/prometheus.py` runs a Prometheus on them; see monitoring/README.md."""
