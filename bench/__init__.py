"""Reproducible benchmarks; each prints one JSON object (DESIGN section 9)."""
