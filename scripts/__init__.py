"""Builders of the data shipped under data/ (run as `python -m scripts.NAME` from the repo root)."""
