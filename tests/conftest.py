"""Test-wide settings: deterministic, single-threaded torch when torch is present."""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(1)
