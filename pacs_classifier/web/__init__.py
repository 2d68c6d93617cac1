"""The web role: health, Prometheus metrics, the JSON API and the dashboard (SPEC §12)."""
