"""Serving: the generation engine (batching, sampling, streaming); the HTTP server builds on it."""

from .generate import GenerationResult, SamplingParams, generate, sample_next

__all__ = ["GenerationResult", "SamplingParams", "generate", "sample_next"]
