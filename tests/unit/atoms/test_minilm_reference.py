"""The bundled all-MiniLM-L6-v2 against sentence-transformers, and its bf16 accuracy.

Both comparisons share one module-scoped load of each model (about a second apiece).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from atoms.embed import embed_texts
from atoms.minilm import load_minilm, minilm_dir
from atoms.precision import cosine_report, model_to_dtype

if TYPE_CHECKING:
    from collections.abc import Iterator

    from atoms.model import Model

SENTENCES = [
    "The cat sits outside on the warm stone steps.",
    "A man is playing a guitar in the park.",
    "Quantum computers use qubits that can hold superpositions of states.",
    "I love pasta.",
    "The new movie is awesome, the actors were brilliant and the story kept me hooked.",
    "Stock markets fell sharply after the central bank raised interest rates again.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
]


@pytest.fixture(scope="module")
def minilm() -> Model:
    return load_minilm()


@pytest.fixture(scope="module")
def reference() -> Iterator[torch.Tensor]:
    st = pytest.importorskip("sentence_transformers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        model = st.SentenceTransformer(str(minilm_dir()), device="cpu")
        with torch.inference_mode():
            yield model.encode(SENTENCES, convert_to_tensor=True, batch_size=8).float()


def test_embeddings_equal_sentence_transformers(minilm: Model, reference: torch.Tensor) -> None:
    ours = embed_texts(minilm, SENTENCES, batch_size=3)  # several batches, reordered back
    report = cosine_report(reference, ours)
    assert report.rows == len(SENTENCES)
    assert report.min >= 0.9999, report
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(SENTENCES)))


def test_bf16_embeddings_stay_close_to_fp32(minilm: Model) -> None:
    bf16 = model_to_dtype(minilm, "bfloat16")
    assert {a.spec.dtype for a in bf16.atoms} == {"bfloat16"}
    report = cosine_report(embed_texts(minilm, SENTENCES), embed_texts(bf16, SENTENCES))
    assert report.min >= 0.999, report
