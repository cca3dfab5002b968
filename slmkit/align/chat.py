"""Chat templates: render a conversation with the Jinja template stored in ``tokenizer_config.json``.

Rendering follows what ``transformers`` does for ``apply_chat_template`` so that a template written for a
Hugging Face model renders the same text here: an ``ImmutableSandboxedEnvironment`` (a template can neither
touch Python objects nor mutate its inputs) with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols``
extension, a ``raise_exception(msg)`` global that templates use to reject bad input, a ``tojson`` filter
that keeps non-ASCII text, and ``strftime_now``. Variables: ``messages``, ``add_generation_prompt`` and the
special tokens (``bos_token``, ``eos_token``, ...) from the tokenizer config.

When rendering fails, :func:`render_chat` renders growing prefixes of the conversation to find the first
message the template rejects, and names its index and role in the error.

:func:`assistant_end_marker` finds the text a template writes after an assistant message's content up to
and including its first special token (``<|end|>``, ``<|im_end|>``, ``<|eot_id|>``, ``</s>``): the end marker
that SFT labels and generation stops on.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES_HINT = "each message needs a 'role' (system, user, assistant) and a string 'content'"


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or a conversation it refuses to render."""


class _TemplateRaised(Exception):
    """Raised by the templates' ``raise_exception``; carries the template's own message."""


def _raise_exception(message: str):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return time.strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile a chat template once (cached by its text). Raises ChatTemplateError naming the template line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: line {e.lineno}: {e.message}") from None


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError(f"messages must be a non-empty list of {{'role', 'content'}} objects; {ROLES_HINT}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"message {i} is a {type(m).__name__}, not an object; {ROLES_HINT}")
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"message {i} has no string 'role'; {ROLES_HINT}")
        if not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i} (role {m['role']!r}) has no string 'content'; {ROLES_HINT}")


def _render(tmpl: jinja2.Template, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
    return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
    """The text ``template`` makes of ``messages`` (``[{"role", "content"}, ...]``).

    ``add_generation_prompt`` appends the header that starts an assistant turn. Extra keyword arguments
    (``bos_token="<s>"``) become template variables. Raises ChatTemplateError naming the message (index and
    role) that broke rendering, with the template's own reason.
    """
    _check_messages(messages)
    tmpl = compile_template(template)
    try:
        return _render(tmpl, messages, add_generation_prompt, variables)
    except (_TemplateRaised, jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
        reason = str(e) if isinstance(e, _TemplateRaised) else f"{type(e).__name__}: {e}"
    # Find the first message whose inclusion makes the template fail: that is the one to name.
    for k in range(1, len(messages) + 1):
        try:
            _render(tmpl, messages[:k], False, variables)
        except Exception as e:  # noqa: BLE001 - any failure of the prefix locates the culprit
            if isinstance(e, _TemplateRaised):
                reason = str(e)
            bad = messages[k - 1]
            raise ChatTemplateError(f"the chat template failed at message {k - 1} (role {bad['role']!r}): "
                                    f"{reason}") from None
    where = "with add_generation_prompt=True" if add_generation_prompt else "on the whole conversation"
    raise ChatTemplateError(f"the chat template failed {where} (after message {len(messages) - 1}, role "
                            f"{messages[-1]['role']!r}): {reason}")


def chat_template_of(tokenizer_config: dict | str | Path) -> tuple[str, dict]:
    """(template, variables) from a tokenizer_config dict, its file, or a directory containing it.

    ``variables`` are the special-token strings templates use (``bos_token``, ``eos_token``, ...). A config
    that lists several named templates (``[{"name", "template"}]``) uses the one named ``default``.
    """
    where = "tokenizer config"
    if not isinstance(tokenizer_config, dict):
        path = Path(tokenizer_config)
        if path.is_dir():
            path = path / "tokenizer_config.json"
        where = str(path)
        if not path.is_file():
            raise ChatTemplateError(f"no tokenizer_config.json at {tokenizer_config}: a chat template is needed; "
                                    "checkpoints made by slmkit have one")
        try:
            tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ChatTemplateError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # transformers' multi-template form
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise ChatTemplateError(f"{where}: no 'chat_template'; add one (slmkit's default is "
                                "slmkit.data.tokenizer.CHAT_TEMPLATE) or use {prompt, completion} records")
    variables = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            variables[key] = value
    return template, variables


def assistant_end_marker(template: str, special_tokens: list[str], **variables) -> str:
    """The text between an assistant message's content and the end of its turn, cut after the first
    special token (``"<|end|>"`` for slmkit's template, ``"<|im_end|>"`` for ChatML); ``""`` when the
    template writes no special token after the content."""
    probe = "\u2063probe\u2063"  # invisible separator: cannot collide with template text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    text = render_chat(template, messages, **variables)
    after = text[text.index(probe) + len(probe):]
    return cut_after_first_special(after, special_tokens)


def cut_after_first_special(text: str, special_tokens: list[str]) -> str:
    """``text`` up to and including the earliest special token in it; ``""`` if it has none."""
    hits = [(text.find(t), -len(t), t) for t in special_tokens if t and t in text]
    if not hits:
        return ""
    pos, neg_len, _ = min(hits)
    return text[:pos - neg_len]
