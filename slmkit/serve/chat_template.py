"""The checkpoint's chat template, as the server holds it.

Rendering is `slmkit.align.chat` — the one renderer SFT, preference pairs, DPO and serving share (Jinja2 in an
`ImmutableSandboxedEnvironment` with `trim_blocks`/`lstrip_blocks` and `raise_exception`, as transformers'
`apply_chat_template`). The sandbox matters here: the template is data shipped with a checkpoint, and the
messages come from HTTP clients.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..align.chat import ChatTemplateError, chat_template_of, compile_template, render_chat

__all__ = ["ChatTemplate", "ChatTemplateError", "load_chat_template"]


class ChatTemplate:
    def __init__(self, source: str, variables: dict | None = None, *, origin: str = "chat template"):
        compile_template(source)  # a syntax error is reported when the server starts, not at the first request
        self.source, self.variables, self.origin = source, dict(variables or {}), origin

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        try:
            return render_chat(self.source, messages, add_generation_prompt, **self.variables)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{self.origin}: {e}") from None


def load_chat_template(checkpoint: str | Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when tokenizer_config.json has none."""
    path = Path(checkpoint) / "tokenizer_config.json"
    if not path.exists():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}") from None
    if not cfg.get("chat_template"):
        return None
    template, variables = chat_template_of(cfg)
    return ChatTemplate(template, variables, origin=f"{path} (chat_template)")
