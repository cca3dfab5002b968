"""llama.cpp itself, without compiling it, as an optional runtime: for checking slmkit's GGUF files in the engine
that reads them (tokenization, scores, greedy tokens), measuring a file's bits per byte there, and timing its prefill
and decoding beside slmkit's.

node-llama-cpp ships llama.cpp's libllama prebuilt for CPUs (per-microarchitecture ggml-cpu variants, chosen at
load); `llama_cpp.mjs`, installed with this package, drives it from a node subprocess. Install once, outside any
repository (Linux x64: ~11 s, 83 MB on disk, ~66 MB downloaded):

    npm i --prefix ~/.cache/slmkit/node-llama-cpp -E node-llama-cpp@3.21.1 @node-llama-cpp/linux-x64@3.21.1 \\
        --omit=optional

(`--omit=optional` skips the CUDA/Vulkan/ARM builds, ~650 MB; on another platform drop both the explicit binary
package and the flag.) SLMKIT_NODE_LLAMA_CPP names another npm prefix that holds the package. It runs offline:
the prebuilt binaries are used as they are (`build: "never"`, `skipDownload`). Without node (>= 20) or the package,
the first request raises `LlamaCppUnavailable` saying which is missing and the command above; `unavailable()`
asks without starting anything.

    from slmkit.llamacpp import LlamaCpp, evaluate_lm
    llm = LlamaCpp("model.gguf", threads=2)
    llm.score(ids).log_probs            # log p of each next token
    evaluate_lm(llm, val, byte_lengths, seq_len=256)["bits_per_byte"]
    llm.timed_decode(prompt, 128).decode_tokens_per_s
"""

from .lm import evaluate_lm
from .process import (DEFAULT_PREFIX, ENV, INSTALL, SCRIPT, VERSION, LlamaCppError, LlamaCppProcess,
                      LlamaCppUnavailable, shared_process, unavailable)
from .runner import DecodeTiming, LlamaCpp, TokenScores

__all__ = ["DEFAULT_PREFIX", "DecodeTiming", "ENV", "INSTALL", "LlamaCpp", "LlamaCppError", "LlamaCppProcess",
           "LlamaCppUnavailable", "SCRIPT", "TokenScores", "VERSION", "evaluate_lm", "shared_process", "unavailable"]
