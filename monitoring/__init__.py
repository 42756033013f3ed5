"""Monitoring: Prometheus metrics and prediction drift, fed by serving."""
