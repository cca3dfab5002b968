"""Q6_K blocks written by slmkit decode, with the `gguf` package's reference decoder, to the weights within
the format's error."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'slmkit[gguf]')")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from slmkit.export.q6k import quantize_q6_k  # noqa: E402


def test_q6_k_blocks_read_back_through_gguf():


    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    w[0, :256] = 0.0  # an all-zero block
    w[1, 7] = 3.0  # an outlier: its sub-block's scale, and the block's super-scale, stretch around it
    blocks = quantize_q6_k(w)
    assert blocks.shape == (8, 2 * 210) and blocks.dtype == np.uint8
    back = gguf.quants.dequantize(blocks, QT.Q6_K).reshape(w.shape)  # gguf's reference decoder
    assert np.all(back[0, :256] == 0)
    # A sub-block's step d * scale_j is its max/32 to within d/2, d = block max / (32 * 128) (the int8 scale's
    # rounding); a value errs by at most half a step, or, when rounding shrank the step, by the clipping of the
    # extreme at q = -32: at most max/32 + 17 d in all.
    sub = np.abs(w.reshape(8, -1, 16)).max(-1, keepdims=True)  # (rows, 32 sub-blocks, 1)
    d = np.abs(w.reshape(8, -1, 256)).max(-1).repeat(16, axis=1)[..., None] / (32 * 128)  # per sub-block
    assert np.all(np.abs(back - w).reshape(8, -1, 16) <= sub / 32 + 17 * d + 1e-7)
    rest = np.ones(w.shape, dtype=bool)
    rest[1, :256] = False
    assert np.linalg.norm((back - w)[rest]) / np.linalg.norm(w[rest]) < 0.025  # 6 bits: ~2% on Gaussian weights
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q6_k(w[:, :128])
