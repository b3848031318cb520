"""Chat templates that imported models ship (Hugging Face's Jinja `chat_template`).

Rule 1: a template is read once, at `nexusd import-model`, from the folder's
`chat_template.jinja` or `tokenizer_config.json` ("chat_template": a string, or a list of
named templates: "default" is taken) and kept beside the model as `chat_template.jinja`.
Rule 2: a template is model-supplied text, so it runs in Jinja's immutable sandbox (no
attribute access beyond the sandbox's, no mutation), with a size cap; a template that
fails to compile or render is an `ApiError(bad_request)` naming the model, never a crash.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ApiError

FILE = "chat_template.jinja"
MAX_TEMPLATE_CHARS = 64 * 1024


def read_shipped(folder: Path) -> str | None:
    """The chat template a Hugging Face folder ships, or None."""
    direct = folder / FILE
    if direct.is_file():
        return _checked(direct.read_text(encoding="utf-8"))
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return None
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return _checked(value) if isinstance(value, str) else None


def _checked(text: str) -> str | None:
    return text if 0 < len(text) <= MAX_TEMPLATE_CHARS else None


def copy_shipped(source: Path, target: Path) -> bool:
    """Keep `source`'s chat template in the model folder `target`; True if it had one."""
    text = read_shipped(source)
    if text is None:
        return False
    (target / FILE).write_text(text, encoding="utf-8")
    return True


def render(template: str, turns: list[tuple[str, str]], *, model: str, eos: str = "") -> str:
    """The prompt for `turns` ((role, content) pairs) with the assistant's turn opened.

    `bos_token` is empty: the tokenizer adds the model's own when it encodes the prompt;
    `eos` is the model's end-of-sequence token as text (closing earlier assistant turns).

    Raises:
        ApiError(bad_request): the template does not compile or render.
    """
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ApiError("bad_request", f"{model}'s chat template refused: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[{"role": r, "content": c} for r, c in turns],
            add_generation_prompt=True,
            bos_token="",
            eos_token=eos,
        )
    except TemplateError as exc:
        raise ApiError("bad_request", f"{model}'s chat template failed: {exc}") from None
