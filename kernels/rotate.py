"""The randomised Hadamard rotation (kvcomp_hf/rotation.py) of a few rows in one launch.

A decode step rotates one token's K and V, the query, and un-rotates the output: [B, H, 1, D] @ [D, D] in
float32. cuBLAS runs such a skinny float32 GEMM in one or two thread blocks (H200 profile of a compiled
Llama-3.1-8B step at 8K x 1: 64 calls of ~51 us each, a third of the step). Here every program takes 16 rows
(of any heads) and multiplies them by H_D with float32 FMAs, so the rows of a step spread over B x H / 16
programs. Same arithmetic as the PyTorch path (float32 products and sums, one rounding to the output dtype);
only the summation order differs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

ROWS = 16  # rows per program (the smallest dot tile)


@triton.jit
def _rotate_kernel(x_ptr, sx_b, sx_h, sx_t, sx_d, s_ptr, h_ptr, out_ptr, T, n_rows, group,
                   D: tl.constexpr, DC: tl.constexpr, INVERSE: tl.constexpr):
    """Rows r = h * T + t of batch row b (program (b, r // ROWS)): out = (x * s) @ H, or INVERSE (x @ H) * s
    (H is symmetric), s = signs of KV head h // group; DC output columns at a time (H's [D, DC] slice stays
    within shared memory for D = 256)."""
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D)
    ok = r < n_rows
    h = r // T
    t = r % T
    x = tl.load(x_ptr + b * sx_b + h.to(tl.int64)[:, None] * sx_h + t.to(tl.int64)[:, None] * sx_t
                + d[None, :] * sx_d, mask=ok[:, None], other=0.0).to(tl.float32)
    s_row = s_ptr + (h // group)[:, None] * D
    if not INVERSE:
        x = x * tl.load(s_row + d[None, :], mask=ok[:, None], other=0.0)
    out_row = out_ptr + b * n_rows * D + r.to(tl.int64)[:, None] * D
    for c in tl.static_range(D // DC):
        dc = c * DC + tl.arange(0, DC)
        y = tl.dot(x, tl.load(h_ptr + d[:, None] * D + dc[None, :]), input_precision="ieee")
        if INVERSE:
            y = y * tl.load(s_row + dc[None, :], mask=ok[:, None], other=0.0)
        tl.store(out_row + dc[None, :], y.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def _launch(x: torch.Tensor, signs: torch.Tensor, h: torch.Tensor, inverse: bool) -> torch.Tensor:
    B, HX, T, D = x.shape
    out = torch.empty((B, HX, T, D), dtype=x.dtype, device=x.device)
    n_rows = HX * T
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _rotate_kernel[(B, triton.cdiv(n_rows, ROWS))](x, *x.stride(), signs, h, out, T, n_rows,
                                                       HX // signs.shape[0], D=D, DC=min(D, 64), INVERSE=inverse,
                                                       num_warps=4)
    return out


@torch.library.custom_op("kvcomp::hadamard_rotate", mutates_args=())
def _rotate_op(x: torch.Tensor, signs: torch.Tensor, h: torch.Tensor, inverse: bool) -> torch.Tensor:
    return _launch(x, signs, h, inverse)


@_rotate_op.register_fake
def _(x, signs, h, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def hadamard_rotate(x: torch.Tensor, signs: torch.Tensor, h: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x [B, HX, T, D] (16/32-bit floats, any strides) -> contiguous, in x's dtype: (x * s) @ h, or with
    inverse (x @ h) * s, s = signs[head // (HX / H)] (signs float32 [H, D] contiguous, h float32 [D, D]
    symmetric). Inside torch.compile a custom op (the graph keeps the launch opaque); eagerly a direct launch."""
    if torch.compiler.is_compiling():
        return torch.ops.kvcomp.hadamard_rotate(x, signs, h, inverse)
    return _launch(x, signs, h, inverse)
