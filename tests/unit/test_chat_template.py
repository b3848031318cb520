"""Chat templates imported models ship: read at import, kept, rendered in Jinja's sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexusd import chat_template
from nexusd.errors import ApiError
from nexusd.http.openai import ChatTemplate, parse_chat
from nexusd.model_registry import import_model

LLAMA3 = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_read_from_tokenizer_config_string_list_and_file(tmp_path: Path) -> None:
    assert chat_template.read_shipped(tmp_path) is None
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": LLAMA3}))
    assert chat_template.read_shipped(tmp_path) == LLAMA3
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA3}]
    config.write_text(json.dumps({"chat_template": named}))
    assert chat_template.read_shipped(tmp_path) == LLAMA3
    (tmp_path / chat_template.FILE).write_text("{{ messages[0]['content'] }}")
    assert chat_template.read_shipped(tmp_path) == "{{ messages[0]['content'] }}"
    (tmp_path / chat_template.FILE).write_text("x" * (chat_template.MAX_TEMPLATE_CHARS + 1))
    assert chat_template.read_shipped(tmp_path) is None


def test_rendered_for_chat_completions() -> None:
    template = ChatTemplate.shipped(LLAMA3, model="m", eos="</s>")
    call = parse_chat({"model": "m", "messages": [{"role": "user", "content": " Hi "}]}, template)
    assert call.prompt == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert call.stop == ()  # the model's end-of-sequence id stops it


def test_a_hostile_or_broken_template_is_a_bad_request() -> None:
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ApiError, match="chat template failed") as exc:
        chat_template.render(escape, [("user", "x")], model="m")
    assert exc.value.code == "bad_request"
    with pytest.raises(ApiError, match="refused: no system role"):
        chat_template.render(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
            "{% endif %}",
            [("system", "x")],
            model="m",
        )
    with pytest.raises(ApiError, match="chat template failed"):
        chat_template.render("{% for %}", [("user", "x")], model="m")


def test_import_keeps_the_template(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
    )
    folder = tmp_path / "tiny-chat"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3}))
    target = import_model(folder, "tiny-chat", tmp_path / "models")
    assert (target / chat_template.FILE).read_text() == LLAMA3
