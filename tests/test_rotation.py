"""The randomised Hadamard rotation (format stage 0): the transform itself, attention through a rotated
cache (PyTorch path), and the Triton store + fused decode with rotation on (interpreter on CPU, real
shapes on CUDA)."""

import contextlib
import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from kvcomp_hf import codec  # noqa: E402
from kvcomp_hf.attention import kvcomp_attention_forward  # noqa: E402
from kvcomp_hf.cache import KVCompLayer  # noqa: E402
from kvcomp_hf.config import KVCompConfig  # noqa: E402
from kvcomp_hf.rotation import LayerRotation, hadamard_matrix, rotation_signs  # noqa: E402

from helpers import FakeAttention, rel_err  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
ROTATED = KVCompConfig(rel_k=0.1, rel_v=0.2, rotation="hadamard", rotation_seed=7)


def causal_mask(b, q_len, kv_len, device="cpu"):
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None].expand(
        b, 1, -1, -1)


@pytest.mark.parametrize("d", [16, 64, 96, 128, 256])
def test_rotation_is_orthonormal_and_round_trips(d):
    h = hadamard_matrix(d, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    rot = LayerRotation(seed=3, layer=5, num_heads=2, head_dim=d, device=torch.device("cpu"))
    x = torch.randn(2, 2, 7, d, dtype=torch.float64)
    for kv in (0, 1):
        y = rot.rotate(x, kv)
        assert not torch.allclose(y, x)
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6)   # lengths kept (float32 arithmetic)
        assert torch.allclose(rot.unrotate(y, kv), x, atol=1e-5)
    # q · k is kept when q uses the K rotation of its KV head (GQA: 3 query heads per KV head)
    q, k = torch.randn(1, 6, 4, d, dtype=torch.float64), torch.randn(1, 2, 9, d, dtype=torch.float64)
    scores = q @ k.repeat_interleave(3, 1).transpose(-1, -2)
    rotated = rot.rotate_query(q) @ rot.rotate(k, 0).repeat_interleave(3, 1).transpose(-1, -2)
    assert torch.allclose(rotated, scores, atol=1e-4)


@pytest.mark.parametrize("d,dtype,heads,t", [(64, torch.float16, 4, 3), (128, torch.bfloat16, 8, 1),
                                             (128, torch.float16, 2, 1), (256, torch.bfloat16, 4, 1),
                                             (64, torch.bfloat16, 2, 400)])
def test_rotation_kernel_matches_the_pytorch_rotation(d, dtype, heads, t):
    """kernels/rotate.py (a decode step's few rows in 16-row programs, a prefill's many (t 400: 2,400 rows) in 64-row
    ones; Triton's interpreter on the CPU) against the float32
    PyTorch formula: same products, one rounding to the dtype, so equal up to the summation order. Queries are
    a transposed view (as attention passes them) with 2 query heads per KV head."""
    from kvcomp_hf.kernels.rotate import hadamard_rotate

    device = "cuda" if HAS_CUDA else "cpu"
    rot = LayerRotation(seed=1, layer=2, num_heads=heads // 2, head_dim=d, device=torch.device(device))
    x = torch.randn(3, t, heads, d, device=device).mul(torch.linspace(0.1, 10, d, device=device)).to(dtype)
    x = x.transpose(1, 2)                                                   # [3, heads, t, d], not contiguous
    for kv in (0, 1):
        for inverse in (False, True):
            signs = rot._signs_for(kv, heads)
            want = (x.float() @ rot.h) * signs if inverse else (x.float() * signs) @ rot.h
            got = hadamard_rotate(x, rot.signs[kv], rot.h_pm1, rot.scale, inverse)
            assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
            ulp = torch.finfo(dtype).eps * want.abs().amax()
            assert (got.float() - want).abs().max() <= ulp, (kv, inverse)
    assert torch.equal(rot.h_pm1.float() * rot.scale, rot.h)       # the kernel's operands are exact
    with pytest.raises(ValueError, match="float16/bfloat16"):
        hadamard_rotate(x.float(), rot.signs[0], rot.h_pm1, rot.scale, False)
    two = LayerRotation(seed=1, layer=2, num_heads=2, head_dim=d, device=torch.device(device))
    with pytest.raises(ValueError, match="KV heads evenly"):
        two._kernel(torch.randn(1, 3, 1, d, device=device), 0, inverse=False)


def test_signs_are_fixed_and_differ_by_layer_kv_and_head():
    a = rotation_signs(0, 3, 0, 4, 64)
    assert torch.equal(a, rotation_signs(0, 3, 0, 4, 64))                 # reproducible: part of the format
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    others = [rotation_signs(0, 3, 1, 4, 64), rotation_signs(0, 4, 0, 4, 64), rotation_signs(1, 3, 0, 4, 64)]
    assert all(not torch.equal(a, o) for o in others)
    assert not torch.equal(a[0], a[1])


def test_bad_rotation_values_name_the_field():
    with pytest.raises(ValueError, match="rotation must be one of"):
        KVCompConfig(rotation="walsh")
    with pytest.raises(ValueError, match="rotation_seed"):
        KVCompConfig(rotation_seed=-1)


def test_rotation_cuts_the_error_of_outlier_channels():
    """Token-wise quantisation of K with a few large channels: the rotated cache reconstructs K (rotated
    back) with a smaller error than the unrotated one at the same rel."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 320, 64, generator=gen)
    k[..., [3, 17, 40]] *= 20
    errs = {}
    for rotation in ("none", "hadamard"):
        layer = KVCompLayer(KVCompConfig(rel_k=0.1, rel_v=0.2, rotation=rotation))
        layer.update(k, k.clone())
        dk, _ = layer.dense_kv(torch.float64)
        n = layer.block_table.shape[1] * 64
        assert n > 0
        errs[rotation] = rel_err(dk[:, :, :n], k[:, :, :n])
    assert errs["hadamard"] < 0.7 * errs["none"], errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_rotation_equals_attention_over_the_derotated_cache(dtype):
    """kvcomp attention on a rotated cache (q rotated once, output rotated back once) equals SDPA over
    the de-rotated dequantised cache, for decode-sized and prefill-sized query chunks, with GQA."""
    torch.manual_seed(4)
    b, h, hq, d = 2, 2, 6, 64
    layer = KVCompLayer(ROTATED, layer_idx=3)
    module = FakeAttention(hq // h)
    for q_len in (300, 1, 16, 64, 1):
        k = (torch.randn(b, h, q_len, d) * torch.linspace(0.5, 4, d)).to(dtype)
        v = torch.randn(b, h, q_len, d).to(dtype)
        hk, hv = layer.update(k, v)
        q = torch.randn(b, hq, q_len, d).to(dtype)
        dk, dv = layer.dense_kv(torch.float64)                               # rotated back
        mask = causal_mask(b, q_len, dk.shape[2])
        got, _ = kvcomp_attention_forward(module, q, hk, hv, mask, scaling=d**-0.5)
        want, _ = sdpa_attention_forward(module, q.double(), dk, dv, mask, scaling=d**-0.5)
        if hk.dense is not None:  # prefill on the empty cache attends over the exact new tokens
            want, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(), mask, scaling=d**-0.5)
        rounding = rel_err(want.to(dtype), want)
        # float32: only float32 arithmetic; bf16: the rotated q, the output's and the tail's bf16 roundings
        bound = 1e-5 if dtype == torch.float32 else 6 * rounding + (0.02 if q_len > 16 else 0.0)
        assert rel_err(got, want) < bound, (q_len, rel_err(got, want), rounding)
    assert layer.block_table.shape[1] > 0


@contextlib.contextmanager
def triton_layer(config, device, layer_idx=0):
    """A KVCompLayer that uses the Triton store and fused decode (under the interpreter on CPU)."""
    from kvcomp_hf import cache as cache_mod

    saved = cache_mod._use_triton, torch.cuda.device
    cache_mod._use_triton = lambda backend, k, fmt: True
    if device == "cpu":
        torch.cuda.device = lambda dev: contextlib.nullcontext()  # the wrappers select the CUDA device
    try:
        yield KVCompLayer(config, layer_idx=layer_idx)
    finally:
        cache_mod._use_triton, torch.cuda.device = saved


def _check_triton_layer_with_rotation(device, b, h, group, d, n_prefill, dtype, decode_steps, config):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(d + n_prefill)
    module = FakeAttention(group)

    def kv(t):
        k = torch.randn(b, h, t, d, generator=gen) * torch.linspace(0.5, 4, d)
        k[..., 5] *= 10  # an outlier channel
        return k.to(dtype).to(device), torch.randn(b, h, t, d, generator=gen).to(dtype).to(device)

    with triton_layer(config, device, layer_idx=2) as layer:
        k, v = kv(n_prefill)
        layer.update(k, v)
        assert layer.use_triton and layer.rotation is not None and layer.block_table.shape[1] > 0
        # the Triton store wrote what the reference codec writes for the rotated K/V
        n, s0 = layer.block_table.shape[1], layer.n_sinks()  # blocks start after the sink tokens
        rk, rv = (layer.rotation.rotate(x[:, :, s0:s0 + n * 64], kvi) for kvi, x in enumerate((k, v)))
        blocks = [x.reshape(b, h, n, 64, d).permute(0, 2, 1, 3, 4).reshape(b * n, h, 64, d) for x in (rk, rv)]
        enc, fmt = codec.encode_blocks(*blocks, config)
        store = layer.store
        assert torch.equal(store.token_min[:b * n].cpu(), enc.token_min.cpu())
        assert torch.equal(store.token_step[:b * n].cpu(), enc.token_step.cpu())
        assert torch.equal(store.perm_of(b * n)[:b * n].cpu(), enc.perm.cpu())
        for s in range(b * n):
            for kvi in (0, 1):
                for hh in range(h):
                    o0, n0 = int(enc.seg_offset[s, kvi, hh]), int(enc.seg_bytes[s, kvi, hh])
                    o1 = int(store.seg_offset[s, kvi, hh])
                    assert torch.equal(store.pool[o1:o1 + n0].cpu(), enc.data[o0:o0 + n0].cpu())
        # fused decode with rotation == attention over the de-rotated dequantised cache
        for step in range(decode_steps):
            k1, v1 = kv(1)
            hk, hv = layer.update(k1, v1)
            q = torch.randn(b, h * group, 1, d, generator=gen).to(dtype).to(device)
            dk, dv = layer.dense_kv(torch.float64)
            mask = causal_mask(b, 1, dk.shape[2], device)
            got, _ = kvcomp_attention_forward(module, q, hk, hv, mask, scaling=d**-0.5)
            want, _ = sdpa_attention_forward(module, q.double(), dk, dv, mask, scaling=d**-0.5)
            rounding = rel_err(want.to(dtype), want)
            assert rel_err(got, want) < max(8 * rounding, 1e-5), (step, rel_err(got, want), rounding)


@pytest.mark.parametrize("d,cfg", [(32, dataclasses.replace(ROTATED, layout="packed")),  # float32: packed kernel
                                   (64, KVCompConfig(rel_k=0.05, rel_v=0.1, granularity="token_head",
                                                     pack_size=8, repack="none", rotation="hadamard"))])
def test_triton_store_and_decode_with_rotation_interpreter(d, cfg):
    if HAS_CUDA:
        pytest.skip("the CUDA variant below covers this on a GPU")
    _check_triton_layer_with_rotation("cpu", 1, 2, 2, d, 200, torch.float32, 2, cfg)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (256, torch.bfloat16),
                                     (128, torch.float16)])
def test_triton_store_and_decode_with_rotation_cuda(d, dtype):
    _check_triton_layer_with_rotation("cuda", 2, 4, 4, d, 1000 + d, dtype, 3, ROTATED)



def test_rotation_kernel_traces_as_one_custom_op():
    """Inside torch.compile the kernel is the custom op kvcomp::hadamard_rotate (no graph break; its fake gives
    the output's shape and layout), with the eager launch's values (interpreter on the CPU)."""
    from kvcomp_hf.kernels.rotate import hadamard_rotate

    rot = LayerRotation(seed=0, layer=1, num_heads=2, head_dim=64, device=torch.device("cpu"))
    x = torch.randn(2, 1, 4, 64).to(torch.bfloat16).transpose(1, 2)            # [2, 4, 1, 64], 2 heads per KV head
    step = lambda t: hadamard_rotate(hadamard_rotate(t, rot.signs[0], rot.h_pm1, rot.scale, False),  # noqa: E731
                                     rot.signs[0], rot.h_pm1, rot.scale, True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    assert got.shape == x.shape and got.is_contiguous() and torch.equal(got, step(x))
    assert (got.float() - x.float()).abs().max() <= 2 ** -6 * x.float().abs().max()  # round trip, two roundings


def test_kernel_takes_only_the_shapes_it_compiles():
    """16-bit rows (decode steps and prefills) go to kernels/rotate.py; head_dim 96 (Phi-3), 8 or 512, float32 and
    inputs past the launch grid's limit stay on the float32 product (the kernel's tiles need a power of two in
    16..256)."""
    from kvcomp_hf.rotation import KERNEL_MAX_ROWS, kernel_rotates

    bf16 = torch.bfloat16
    assert kernel_rotates((8, 32, 1, 128), bf16) and kernel_rotates((1, 8, 1, 256), torch.float16)
    assert kernel_rotates((1, 4, 1, 16), bf16)
    assert not any(kernel_rotates((1, 32, 1, d), bf16) for d in (8, 96, 512))
    assert not kernel_rotates((1, 32, 1, 128), torch.float32)
    assert kernel_rotates((8, 8, 32768, 128), bf16)                     # a prefill's K or V
    assert kernel_rotates((2, 1, KERNEL_MAX_ROWS, 128), bf16)
    assert not kernel_rotates((1, 2, KERNEL_MAX_ROWS, 128), bf16)      # past the grid: the float32 product
    assert not kernel_rotates((32, 1, 128), bf16)
