"""Errors of the atoms package.

Rule 1: every message names the atom or file, what was expected and what was received.
"""

from __future__ import annotations


class AtomError(Exception):
    """Root of every error raised by `atoms`."""


class ShapeMismatch(AtomError):
    """An input tensor whose shape does not fit the atom."""


class DtypeMismatch(AtomError):
    """An input tensor of the wrong dtype."""


class NonFiniteInput(AtomError):
    """An input tensor holding NaN or Inf."""


class WeightsError(AtomError):
    """A weight file that is missing, corrupt, or does not match its manifest hash."""


class ModelFormatError(AtomError):
    """A model folder or config that is not of a supported family or layout."""


class CacheNotReady(AtomError):
    """A cached forward on an atom whose KV cache was never set up."""


class CacheExhausted(AtomError):
    """A KV cache set-up or append that would exceed the byte budget or its capacity."""


class UnsupportedOperation(AtomError):
    """A request the model or atom cannot serve (e.g. generation on an encoder-only model)."""


class PartitionError(AtomError):
    """No contiguous split of a model's atoms fits the given hosts (memory, throughput)."""


class InputOutOfRange(AtomError):
    """An input whose values are outside what the atom accepts (token id >= vocab, position too far)."""


class GenerationStateError(AtomError):
    """A generation loop driven out of order (e.g. `feed` before `start`, or after `Done`)."""


class DataError(AtomError, ValueError):
    """A data file (training corpus, labelled set) that is missing, empty, too large or not text."""
