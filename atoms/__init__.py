"""atoms: neural computation without networking — atoms, model families, spans, generation.

Rule 1: this package imports only torch, safetensors, tokenizers and the standard library;
never trio, libp2p, mesh or nexusd (tests/unit/test_layering.py checks).
Rule 2: the public names are re-exported here, lazily (PEP 562), so that importing a light
module such as `atoms.errors` does not load torch; everything else is private to its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .atom import Atom as Atom
    from .atom import AtomKind as AtomKind
    from .atom import AtomSpec as AtomSpec
    from .atom import ForwardContext as ForwardContext
    from .atom import IOKind as IOKind
    from .cache import KVLayout as KVLayout
    from .cache import SessionCache as SessionCache
    from .embed import embed_texts as embed_texts
    from .errors import AtomError as AtomError
    from .errors import CacheExhausted as CacheExhausted
    from .errors import CacheNotReady as CacheNotReady
    from .errors import ModelFormatError as ModelFormatError
    from .errors import WeightsError as WeightsError
    from .generation import GenerationParams as GenerationParams
    from .generation import TokenGenerator as TokenGenerator
    from .generation import generate as generate
    from .minilm import load_minilm as load_minilm
    from .model import Model as Model
    from .model import load_model as load_model
    from .model import load_span as load_span
    from .model import save_model as save_model
    from .partition import ModelManifest as ModelManifest
    from .partition import split_spans as split_spans
    from .span import Span as Span
    from .tokenizer import TextTokenizer as TextTokenizer

_EXPORTS: dict[str, str] = {
    "Atom": ".atom",
    "AtomKind": ".atom",
    "AtomSpec": ".atom",
    "ForwardContext": ".atom",
    "IOKind": ".atom",
    "KVLayout": ".cache",
    "SessionCache": ".cache",
    "embed_texts": ".embed",
    "AtomError": ".errors",
    "CacheExhausted": ".errors",
    "CacheNotReady": ".errors",
    "ModelFormatError": ".errors",
    "WeightsError": ".errors",
    "GenerationParams": ".generation",
    "TokenGenerator": ".generation",
    "generate": ".generation",
    "load_minilm": ".minilm",
    "Model": ".model",
    "load_model": ".model",
    "load_span": ".model",
    "save_model": ".model",
    "ModelManifest": ".partition",
    "split_spans": ".partition",
    "Span": ".span",
    "TextTokenizer": ".tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'atoms' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module, __name__), name)
