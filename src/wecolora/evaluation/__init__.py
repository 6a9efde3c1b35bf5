"""Evaluation of frozen models: features, linear probes, kNN, metrics and reports."""
