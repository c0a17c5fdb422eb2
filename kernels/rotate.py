"""The randomised Hadamard rotation (kvcomp_hf/rotation.py) of 16-bit rows in one launch.

A decode step rotates one token's K and V, the query, and un-rotates the output: [B, H, 1, D] @ [D, D].
cuBLAS runs such a skinny float32 GEMM in one or two thread blocks (H200, CUDA graph, Llama-3.1-8B shape at
batch 1: ~31 us per rotation, four per layer). A prefill rotates its K and V: the float32 product converts,
multiplies and converts back in five passes over float32 copies. Here every program takes 16 rows (64 for long
inputs: fewer loads of the matrix per row) and multiplies them by the
unnormalised ±1 Hadamard matrix on the tensor cores in TF32: a 16-bit value (x * s too) and ±1 are exact in
TF32, so the products are exact and the sums float32, and the scale 1/sqrt(B) is applied in float32 before the
one rounding to the output dtype. Same result as the float32 formula up to the summation order. (TF32 rather
than a bf16 dot: Triton's interpreter gets bf16 dots wrong.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp_hf.block_store import device_context


@triton.jit
def hadamard_cols(x, h_ptr, c, scale, D: tl.constexpr, DC: tl.constexpr):
    """Columns c*DC .. c*DC+DC of scale * x @ H: x [R, D] float32 (R >= 16) holding 16-bit values (times ±1),
    H the ±1 matrix [D, D] at h_ptr (row-major). TF32 products are exact for such x, the sums float32; every
    caller uses this one dot, so a row rotated here equals the same row rotated by another kernel."""
    d = tl.arange(0, D)
    dc = c * DC + tl.arange(0, DC)
    return tl.dot(x, tl.load(h_ptr + d[:, None] * D + dc[None, :]), input_precision="tf32") * scale


@triton.jit
def _rotate_kernel(x_ptr, sx_b, sx_h, sx_t, sx_d, s_ptr, h_ptr, out_ptr, T, n_rows, group, scale,
                   D: tl.constexpr, DC: tl.constexpr, INVERSE: tl.constexpr, ROWS: tl.constexpr):
    """Rows r = h * T + t of batch row b (program (b, r // ROWS)): out = (x * s) @ H, or INVERSE (x @ H) * s
    (H symmetric), s = signs of KV head h // group, H = scale * h_ptr (float32 entries ±1 or 0); DC output
    columns at a time (H's [D, DC] slice stays within shared memory for D = 256)."""
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
        y = hadamard_cols(x, h_ptr, c, scale, D, DC)
        if INVERSE:
            y = y * tl.load(s_row + dc[None, :], mask=ok[:, None], other=0.0)
        tl.store(out_row + dc[None, :], y.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def _launch(x: torch.Tensor, signs: torch.Tensor, h_pm1: torch.Tensor, scale: float, inverse: bool) -> torch.Tensor:
    B, HX, T, D = x.shape
    out = torch.empty((B, HX, T, D), dtype=x.dtype, device=x.device)
    n_rows = HX * T
    rows = 16 if B * n_rows <= 16 * 132 else 64  # 16: the smallest dot tile, for the few rows of a decode step
    with device_context(x.device):
        _rotate_kernel[(B, triton.cdiv(n_rows, rows))](x, *x.stride(), signs, h_pm1, out, T, n_rows,
                                                       HX // signs.shape[0], scale, D=D, DC=min(D, 64),
                                                       INVERSE=inverse, ROWS=rows, num_warps=4 if rows == 16 else 8)
    return out


@torch.library.custom_op("kvcomp::hadamard_rotate", mutates_args=())
def _rotate_op(x: torch.Tensor, signs: torch.Tensor, h_pm1: torch.Tensor, scale: float,
               inverse: bool) -> torch.Tensor:
    return _launch(x, signs, h_pm1, scale, inverse)


@_rotate_op.register_fake
def _(x, signs, h_pm1, scale, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def hadamard_rotate(x: torch.Tensor, signs: torch.Tensor, h_pm1: torch.Tensor, scale: float,
                    inverse: bool) -> torch.Tensor:
    """x [B, HX, T, D] (float16/bfloat16, any strides) -> contiguous, in x's dtype: (x * s) @ H, or with
    inverse (x @ H) * s; s = signs[head // (HX / H)] (float32 [H, D] contiguous), H = scale * h_pm1
    (h_pm1: the symmetric float32 ±1/0 matrix [D, D]). Inside torch.compile a custom op (the graph keeps the
    launch opaque); eagerly a direct launch."""
    if x.dtype not in (torch.float16, torch.bfloat16):  # (float32 values are not exact in TF32)
        raise ValueError(f"hadamard_rotate takes float16/bfloat16 x, got {x.dtype}")
    if torch.compiler.is_compiling():
        return torch.ops.kvcomp.hadamard_rotate(x, signs, h_pm1, scale, inverse)
    return _launch(x, signs, h_pm1, scale, inverse)
