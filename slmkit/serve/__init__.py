"""Serving: the generation engine (batching, sampling, streaming); the HTTP server builds on it.

`slmkit.serve.server` (FastAPI, uvicorn) is imported on demand so the package works without the serve extra."""

from .engine import Engine, EngineBusy, EngineRequest
from .generate import GenerationResult, SamplingParams, generate, sample_next

__all__ = ["Engine", "EngineBusy", "EngineRequest", "GenerationResult", "SamplingParams", "generate", "sample_next"]
