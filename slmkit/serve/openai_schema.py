"""Request bodies of the OpenAI-compatible API and OpenAI-style error objects.

The fields follow OpenAI's API reference for `/v1/completions` and `/v1/chat/completions`. As OpenAI
does, unknown fields are ignored; types are strict (the string "5" is not a number, true is not an
integer) and NaN/Infinity are rejected. Ranges that do not depend on the model are checked here; limits
that do (context window, `--max-prompt-tokens`, `--max-n`, known model names) are checked by the server.
Every violation becomes an `ApiError` whose body is `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20


class ApiError(Exception):
    """An error answered with an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    # int64, as OpenAI's API documents it; `n` samples use seed, seed + 1, ... which stays inside the
    # range torch.Generator accepts ([-2**63, 2**64 - 1]), so no seed reaches the engine as a 500.
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}: checked and compiled (or refused
    # with a 400) by serve/constrained.py, which enforces it per token.
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def parse_request(model: type[_Strict], body: bytes) -> _Strict:
    """Validate a JSON body; malformed JSON and every schema violation raise a 400 `ApiError`."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {err['msg']}", code="invalid_json") from None
        if not err["loc"] and err["type"] == "model_type":
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json") from None
        loc = [str(x) for x in err["loc"] if not _is_union_branch(x)]
        param = ".".join(loc) or None
        given = err.get("input")
        shown = "" if err["type"] == "missing" else f" (got {_short(given)})"
        raise ApiError(400, f"{param}: {err['msg']}{shown}", param=param, code="invalid_value") from None


def _is_union_branch(loc_part) -> bool:
    # pydantic names the union member it tried ("str", "list[int]", "function-after[...]") in the location.
    return isinstance(loc_part, str) and (loc_part in {"str", "int", "float", "bool"} or "[" in loc_part)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
