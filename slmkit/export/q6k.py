"""Q6_K quantization for GGUF files: ggml's 6-bit k-quant, which llama.cpp's quantizer gives the output
matrix of a Q4_0 model (the `gguf` package can read Q6_K but not write it).

A block covers 256 consecutive values of a row: 16 sub-blocks of 16 values, each with an int8 scale, under
one fp16 super-scale d, so w = d · scale_j · q with q in [-32, 31]. Stored as 210 bytes per block:
`ql` (128 bytes: the low 4 bits of q + 32), `qh` (64 bytes: the high 2 bits), `scales` (16 int8) and `d`
(fp16), with ggml's interleaving: in each half of 128 values, value l (0..31) of the four 32-value quarters
shares ql[l] / ql[l + 32] (low and high nibbles) and qh[l] (2 bits each).

Scales follow ggml's reference rule: a sub-block's scale maps its largest-magnitude value to -32 exactly;
the super-scale maps the largest-magnitude sub-scale to -128 (clamped to 127). ggml's quantizer then
searches nearby scales to lower the squared error; this one does not, so its error is a little higher.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2  # 210


def _signed_extreme(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude along the last axis, with its sign: (..., n) -> (...)."""
    idx = np.abs(x).argmax(axis=-1)
    return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """(rows, cols) float -> (rows, cols / 256 * 210) uint8 Q6_K blocks; cols must be a multiple of 256."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"Q6_K needs rows of a multiple of {QK_K} values, not {cols}")
    x = w.reshape(-1, QK_K // 16, 16)  # (blocks, 16 sub-blocks, 16 values)
    ext = _signed_extreme(x)  # (blocks, 16)
    with np.errstate(divide="ignore"):
        sub_scale = np.where(ext != 0, ext / -32.0, 0.0)  # x ≈ sub_scale * q, the extreme at q = -32
        ext_s = _signed_extreme(sub_scale)  # (blocks,)
        d = np.where(ext_s != 0, ext_s / -128.0, 0.0).astype(np.float16)  # super-scale, stored in fp16
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(d32[:, None] != 0, np.round(sub_scale / d32[:, None]), 0)
    scales = np.clip(scales, -128, 127).astype(np.int8)  # (blocks, 16)
    step = d32[:, None] * scales.astype(np.float32)  # (blocks, 16): the effective scale of each sub-block
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] != 0, np.round(x / step[..., None]), 0)
    L = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # (blocks, half, quarter, 32)
    lo = L & 0x0F
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)  # (blocks, 2, 64)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).astype(np.uint8)  # (blocks, 2, 32)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), scales.view(np.uint8),
                             d.reshape(-1, 1).view(np.uint8)], axis=1)  # (blocks, 210)
    return blocks.reshape(rows, cols // QK_K * BLOCK_BYTES)
