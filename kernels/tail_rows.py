"""The 8-bit tail rows (config.tail_bits, codec.encode_tail / decode_tail) in one launch each.

Eager decoding with tail_bits codes the new token's K and V and decodes the whole tail every step and layer. In
PyTorch that is 37 more small ops per layer and step than a bf16 tail, each a kernel launch: on an H100,
Llama-3.1-8B shape, 1.41-1.61x the bf16-tail preset's eager step. Here encoding K and V is one launch, and decoding
them together with the exact sinks in front (KVCompLayer.tail) is one more: 1.08-1.16x (eval/RESULTS.md).
Bit for bit the codec's functions, which stay the specification: the same float32 operations in the same order
as PyTorch runs them on the data's device (a division correctly rounded, except that CUDA PyTorch divides by the
number of levels as a product with its reciprocal), rounding half to even, and the decode's multiply and add kept
apart (launched with enable_fp_fusion=False: an FMA would round once where PyTorch rounds twice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp_hf.block_store import device_context
from kvcomp_hf.codec import TAIL_BITS

from .store import _rne

LEVELS = 2**TAIL_BITS - 1
ROWS = 16  # rows per program


@triton.jit
def _row_index(r, T, H):
    """Row r of a [B, H, T, D] tensor -> (b, h, t), int64."""
    r = r.to(tl.int64)
    return r // (H * T), (r // T) % H, r % T


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE, rounding to nearest even as torch's .to() does (Triton's interpreter truncates to
    bfloat16, so bfloat16 rounds here by its bits, the same code on the GPU and in CI)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = tl.where(x != x, x.to(DTYPE), (bits >> 16).to(tl.uint16).to(DTYPE, bitcast=True))  # NaN stays NaN
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def _row_scale(lo, hi, LEVELS: tl.constexpr, RECIPROCAL: tl.constexpr):
    """(hi - lo) / LEVELS as the codec computes it on the data's device: PyTorch on CUDA divides by a Python number
    as a product with its float32 reciprocal (ATen's div_true_kernel_cuda), on the CPU it divides."""
    if RECIPROCAL:
        scale = (hi - lo) * (1.0 / LEVELS)  # 1/255 rounded once to float32 (the double is no float32 midpoint)
    else:
        scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, LEVELS, tl.float32))
    return scale


# the tail grows by a token a step: its length and strides are not specialised, or every new divisibility by 16
# would compile another variant in the middle of generate()
@triton.jit(do_not_specialize=["sk_b", "sk_h", "sk_t", "sv_b", "sv_h", "sv_t", "so_kv", "so_b", "so_h", "so_t", "T",
                               "n_rows"])
def _encode_rows_kernel(k_ptr, v_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, out_ptr, out16_ptr, so_kv, so_b, so_h,
                        so_t, H, T, n_rows, D: tl.constexpr, LEVELS: tl.constexpr, ROWS: tl.constexpr,
                        RECIPROCAL: tl.constexpr):
    """Program (i, kv) codes rows i*ROWS.. of K (kv 0) or V (kv 1): out (uint8) gets each row's codes, then its
    min and max in the model dtype (out16_ptr: the same bytes seen as that dtype; so_*: strides in bytes)."""
    kv = tl.program_id(1)
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = r < n_rows
    b, h, t = _row_index(r, T, H)
    d = tl.arange(0, D)
    if kv == 0:
        x = tl.load(k_ptr + (b * sk_b + h * sk_h + t * sk_t)[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    else:
        x = tl.load(v_ptr + (b * sv_b + h * sv_h + t * sv_t)[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    x32 = x.to(tl.float32)
    nan = tl.sum((x32 != x32).to(tl.int32), axis=1) > 0  # torch.aminmax propagates NaN; tl.min/max skip it
    lo = tl.where(nan, float("nan"), tl.min(x32, axis=1))
    hi = tl.where(nan, float("nan"), tl.max(x32, axis=1))
    scale = _row_scale(lo, hi, LEVELS, RECIPROCAL)
    safe = tl.where(scale == 0, 1.0, scale)
    y = tl.math.div_rn(x32 - lo[:, None], safe[:, None])
    q = tl.minimum(tl.maximum(_rne(tl.maximum(y, 0.0)), 0), LEVELS)  # y < 0 only by NaN: codes 0
    row = kv * so_kv + b * so_b + h * so_h + t * so_t
    tl.store(out_ptr + row[:, None] + d[None, :], q.to(tl.uint8), mask=ok[:, None])
    row16 = (row + D) // 2  # the min and max follow the D codes (16-bit dtypes: D and the strides are even)
    tl.store(out16_ptr + row16, lo.to(out16_ptr.dtype.element_ty), mask=ok)
    tl.store(out16_ptr + row16 + 1, hi.to(out16_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["sk_b", "sk_h", "sk_t", "sv_b", "sv_h", "sv_t", "ssk_b", "ssk_h", "ssk_t", "ssv_b",
                               "ssv_h", "ssv_t", "S", "so_kv", "so_b", "so_h", "so_t", "L", "n_rows"])
def _decode_rows_kernel(k_ptr, v_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, k16_ptr, v16_ptr,
                        sink_k_ptr, sink_v_ptr, ssk_b, ssk_h, ssk_t, ssv_b, ssv_h, ssv_t, S,
                        out_ptr, so_kv, so_b, so_h, so_t,
                        H, L, n_rows, D: tl.constexpr, LEVELS: tl.constexpr, ROWS: tl.constexpr,
                        RECIPROCAL: tl.constexpr):
    """Program (i, kv): rows i*ROWS.. of out[kv] [B, H, L = S + T, D]: the S exact sinks, then the T rows decoded
    (k_ptr/v_ptr: uint8 rows with strides in bytes; k16_ptr/v16_ptr: the same bytes seen as the model dtype)."""
    kv = tl.program_id(1)
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = r < n_rows
    b, h, t = _row_index(r, L, H)
    d = tl.arange(0, D)
    sink = ok & (t < S)
    row_ok = ok & (t >= S)
    tr = tl.maximum(t - S, 0)
    if kv == 0:
        rows, rows16 = k_ptr, k16_ptr
        row = b * sk_b + h * sk_h + tr * sk_t
        exact = tl.load(sink_k_ptr + (b * ssk_b + h * ssk_h + t * ssk_t)[:, None] + d[None, :], mask=sink[:, None],
                        other=0.0)
    else:
        rows, rows16 = v_ptr, v16_ptr
        row = b * sv_b + h * sv_h + tr * sv_t
        exact = tl.load(sink_v_ptr + (b * ssv_b + h * ssv_h + t * ssv_t)[:, None] + d[None, :], mask=sink[:, None],
                        other=0.0)
    codes = tl.load(rows + row[:, None] + d[None, :], mask=row_ok[:, None], other=0)
    lo = tl.load(rows16 + (row + D) // 2, mask=row_ok, other=0.0).to(tl.float32)
    hi = tl.load(rows16 + (row + D) // 2 + 1, mask=row_ok, other=0.0).to(tl.float32)
    scale = _row_scale(lo, hi, LEVELS, RECIPROCAL)
    x = codes.to(tl.float32) * scale[:, None] + lo[:, None]  # two roundings (launched without FP fusion)
    x = tl.where(sink[:, None], exact.to(tl.float32), x)
    tl.store(out_ptr + kv * so_kv + (b * so_b + h * so_h + t * so_t)[:, None] + d[None, :],
             _rounded(x, out_ptr.dtype.element_ty), mask=ok[:, None])


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x [B, H, T, D] with unit stride along D (the kernels read rows as runs), copied only if it has none."""
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(x.shape)}")
    return x if x.stride(3) == 1 else x.contiguous()


def _dtype_view(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows' bytes as `dtype` (same memory and start), for the min and max at the end of each row."""
    try:
        return rows.view(dtype)
    except RuntimeError as err:
        raise ValueError(f"tail rows of shape {tuple(rows.shape)} and strides {rows.stride()} cannot be read as "
                         f"{dtype}: {err}") from None


def encode_rows(k: torch.Tensor, v: torch.Tensor, *, reciprocal: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """codec.encode_tail of k and of v [B, H, T, D] (float16 or bfloat16), in one launch: two uint8 views
    [B, H, T, D + 4] of one [2, B, H, T, D + 4] tensor. reciprocal: whether a row's range is divided by 255 as a
    product with the reciprocal (None: as PyTorch does on the data's device, i.e. on CUDA)."""
    k, v = _rows(k, "k"), _rows(v, "v")
    if k.shape != v.shape or k.dtype != v.dtype or k.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"k and v must have one shape and a 16-bit float dtype, got {tuple(k.shape)} {k.dtype} and "
                         f"{tuple(v.shape)} {v.dtype}")
    B, H, T, D = k.shape
    out = torch.empty(2, B, H, T, D + 2 * k.dtype.itemsize, dtype=torch.uint8, device=k.device)
    n = B * H * T
    if n:
        with device_context(k.device):
            _encode_rows_kernel[(triton.cdiv(n, ROWS), 2)](
                k, v, *k.stride()[:3], *v.stride()[:3], out, out.view(k.dtype), *out.stride()[:4], H, T, n,
                D=D, LEVELS=LEVELS, ROWS=ROWS, RECIPROCAL=k.is_cuda if reciprocal is None else reciprocal,
                num_warps=4)
    return out[0], out[1]


def decode_rows(k_rows: torch.Tensor, v_rows: torch.Tensor, dtype: torch.dtype, sink_k: torch.Tensor | None = None,
                sink_v: torch.Tensor | None = None, *, reciprocal: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """codec.decode_tail of k_rows and v_rows [B, H, T, D + 4] (uint8) in `dtype`, after the exact sinks
    sink_k, sink_v [B, H, S, D] if given, in one launch: two views [B, H, S + T, D] of one [2, B, H, S + T, D].
    reciprocal: as encode_rows."""
    k_rows, v_rows = _rows(k_rows, "k_rows"), _rows(v_rows, "v_rows")
    if k_rows.shape != v_rows.shape or k_rows.dtype != torch.uint8 or v_rows.dtype != torch.uint8:
        raise ValueError(f"k_rows and v_rows must be uint8 rows of one shape, got {tuple(k_rows.shape)} "
                         f"{k_rows.dtype} and {tuple(v_rows.shape)} {v_rows.dtype}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    B, H, T, width = k_rows.shape
    D = width - 2 * dtype.itemsize
    if sink_k is None:
        sink_k = sink_v = k_rows.new_empty(B, H, 0, D, dtype=dtype)
    sink_k, sink_v = _rows(sink_k, "sink_k"), _rows(sink_v, "sink_v")
    if sink_k.shape != sink_v.shape or sink_k.shape[:2] != (B, H) or sink_k.shape[3] != D or sink_k.dtype != dtype \
            or sink_v.dtype != dtype:
        raise ValueError(f"sink_k and sink_v must be [B={B}, H={H}, S, D={D}] in {dtype}, got "
                         f"{tuple(sink_k.shape)} {sink_k.dtype} and {tuple(sink_v.shape)} {sink_v.dtype}")
    S = sink_k.shape[2]
    out = torch.empty(2, B, H, S + T, D, dtype=dtype, device=k_rows.device)
    n = B * H * (S + T)
    if n:
        with device_context(k_rows.device):
            _decode_rows_kernel[(triton.cdiv(n, ROWS), 2)](
                k_rows, v_rows, *k_rows.stride()[:3], *v_rows.stride()[:3], _dtype_view(k_rows, dtype),
                _dtype_view(v_rows, dtype), sink_k, sink_v, *sink_k.stride()[:3], *sink_v.stride()[:3], S,
                out, *out.stride()[:4], H, S + T, n, D=D, LEVELS=LEVELS, ROWS=ROWS,
                RECIPROCAL=k_rows.is_cuda if reciprocal is None else reciprocal, num_warps=4, enable_fp_fusion=False)
    return out[0], out[1]
