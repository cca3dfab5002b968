"""The tokenizer endpoints at the server's root, as vLLM serves them and lm-evaluation-harness reads them.

- `GET /tokenizer_info`: the special tokens (`bos_token`, `eos_token`, `pad_token`), the chat template and the
  context window. lm-eval's `local-completions` model (`tokenizer_backend="auto"` or `"remote"`) looks for this
  endpoint and then needs no Hugging Face tokenizer download.
- `POST /tokenize` `{"prompt": str, "add_special_tokens": bool = true}` or `{"messages": [...],
  "add_generation_prompt": bool = true}` -> `{"tokens": [...], "count", "max_model_len", "token_strs"}`.
  `add_special_tokens` adds the BOS token as the server does to a text prompt; lm-eval asks without it.
  Special tokens written in the text (`<|bos|>`) are recognised, so `tokenize(eos_token)` is the eos id.
- `POST /detokenize` `{"tokens": [int, ...]}` -> `{"prompt": str}` (special tokens kept, so the text tokenizes
  back to the same ids).

Limits: the body limit of every request (413), at most `MAX_TOKENIZE_CHARS` characters to tokenize and
`MAX_DETOKENIZE_TOKENS` ids to detokenize (413), ids inside the vocabulary (400).
"""

from __future__ import annotations

from typing import Union

from pydantic import Field

from .openai_schema import ApiError, ChatMessage, _Strict

MAX_TOKENIZE_CHARS = 1 << 18
MAX_DETOKENIZE_TOKENS = 1 << 16


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: Union[str, None] = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def tokenizer_info(engine, chat_template) -> dict:
    tok, cfg = engine.tokenizer, engine.config

    def name(token_id):
        return tok.id_to_token(token_id) if token_id is not None else None

    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(cfg.bos_token_id),
            "eos_token": name(cfg.eos_token_id), "pad_token": name(cfg.pad_token_id),
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "add_bos_token": cfg.bos_token_id is not None,
            "chat_template": chat_template.source if chat_template is not None else None,
            "model_max_length": cfg.max_position_embeddings, "max_model_len": cfg.max_position_embeddings,
            "vocab_size": cfg.vocab_size}


def tokenize(engine, chat_template, req: TokenizeRequest) -> dict:
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "give exactly one of 'prompt' (text) or 'messages' (a chat)", param="prompt",
                       code="invalid_value")
    if req.messages is not None:
        if chat_template is None:
            raise ApiError(400, "this checkpoint has no chat template; tokenize a 'prompt' instead",
                           param="messages", code="no_chat_template")
        from .chat_template import ChatTemplateError

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            text = chat_template.render(messages, add_generation_prompt=req.add_generation_prompt)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        param = "messages"
    else:
        text, param = req.prompt, "prompt"
    if len(text) > MAX_TOKENIZE_CHARS:
        raise ApiError(413, f"{param}: {len(text)} characters to tokenize, more than this server's limit of "
                            f"{MAX_TOKENIZE_CHARS}; split the text", param=param, code="request_too_large")
    ids = engine.encode(text, bos=req.add_special_tokens)
    out = {"count": len(ids), "max_model_len": engine.config.max_position_embeddings, "tokens": ids,
           "token_strs": None}
    if req.return_token_strs:
        out["token_strs"] = [engine.tokenizer.id_to_token(i) for i in ids]
    return out


def detokenize(engine, req: DetokenizeRequest) -> dict:
    ids, V = req.tokens, engine.config.vocab_size
    if len(ids) > MAX_DETOKENIZE_TOKENS:
        raise ApiError(413, f"tokens: {len(ids)} ids, more than this server's limit of {MAX_DETOKENIZE_TOKENS}",
                       param="tokens", code="request_too_large")
    bad = next((t for t in ids if not 0 <= t < V), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {V})", param="tokens",
                       code="invalid_value")
    return {"prompt": engine.tokenizer.decode(ids, skip_special_tokens=False)}
