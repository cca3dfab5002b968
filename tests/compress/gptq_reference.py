"""The straightforward GPTQ column loop `slmkit.compress.gptq.gptq_quantize` started from: the fast one (transposed
blocks, one thread for the per-column work and the factorisation) must give the same codes, scales and zero points,
bit for bit, when both run on one thread (LAPACK's factors can differ in the last bit between thread counts)."""

from __future__ import annotations

import torch

from slmkit.compress.base import PassError
from slmkit.compress.qlinear import INT4_QMAX, INT8_QMAX, int4_params, int8_scales
from slmkit.compress.quantize import QuantizedWeight


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """As first written: LAPACK on however many threads torch has."""
    mean_diag = float(H.diagonal().mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(4):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, damp
        damp = min(damp * 10, 1.0)
    raise PassError(f"quant.gptq: the calibration Hessian is not positive definite even with damp={damp}")


def gptq_quantize_reference(weight: torch.Tensor, H: torch.Tensor, *, bits: int = 4, group_size: int | None = 128,
                            act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                            format: str = "minmax") -> QuantizedWeight:
    """The column loop as first written (one column of W at a time, in place), kept to check the fast one."""
    W = weight.detach().float().clone()  # (rows, cols)
    sdtype = weight.dtype  # scales are rounded to values this dtype (their storage) holds exactly
    rows, cols = W.shape
    if bits == 4 and (cols % group_size or block_size % group_size):
        raise ValueError(f"group_size={group_size} must divide in_features={cols} and block_size={block_size}")
    H = H.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    grouped = bits == 4
    g = group_size if grouped else cols

    if grouped:
        scales = torch.empty(rows, cols // g, device=W.device)
        zeros = torch.empty(rows, cols // g, dtype=torch.uint8, device=W.device)
    else:
        scales, zeros = int8_scales(W, sdtype).float(), None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        if grouped:  # static groups, fitted from the original weights in the original order
            scales, zeros = int4_params(W, g, sdtype, format)
            scales = scales.float()
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(cols, device=W.device)
    group_of = perm // g  # group (in the stored order) of each processed column

    U, damp_used = _inverse_hessian_factor(H, damp)
    del H
    codes = torch.empty(rows, cols, dtype=torch.int16, device=W.device)  # in processing order
    loss = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (rows, B): the block, updated column by column
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            gi = int(group_of[col])
            if grouped and not act_order and col % g == 0:  # fit the group when its first column is reached
                s_g, z_g = int4_params(W1[:, i:i + g], g, sdtype, format)
                scales[:, gi], zeros[:, gi] = s_g[:, 0], z_g[:, 0]
            if grouped:
                s, z = scales[:, gi], zeros[:, gi].float()
                q = torch.clamp(torch.round(w / s) + z, 0, INT4_QMAX)
                w_hat = (q - z) * s
            else:
                q = torch.clamp(torch.round(w / scales), -INT8_QMAX, INT8_QMAX)
                w_hat = q * scales
            codes[:, col] = q.to(torch.int16)
            d = U1[i, i]
            loss += (w - w_hat) ** 2 / d ** 2 / 2
            err = (w - w_hat) / d  # (rows,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of every later column

    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    codes = codes.to(torch.uint8 if grouped else torch.int8)
    return QuantizedWeight(codes, scales, zeros, float(loss.sum()), damp_used)
