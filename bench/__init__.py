"""Reproducible benchmarks; each prints one JSON object (docs/architecture.md §9)."""
