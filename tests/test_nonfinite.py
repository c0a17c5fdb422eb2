"""Non-finite K/V values: a quantisation group that holds a NaN or ±inf is stored as NaN (it decodes as NaN),
and every other value keeps its error bound. The Triton store writes the same bytes (interpreter on CPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

from kvcomp_hf import codec  # noqa: E402
from kvcomp_hf.config import KVCompConfig  # noqa: E402

BAD = [float("inf"), float("-inf"), float("nan")]


def groups_of(x, granularity):
    """[n, H, 64, D] -> [n, 64, G, values of the group] (the quantisation groups of codec.quantize)."""
    n, h, t, d = x.shape
    g = x.permute(0, 2, 1, 3)
    return g.reshape(n, t, 1, h * d) if granularity == "token" else g


def check_bound_and_nan(x, x_hat, rel, granularity, bad_group):
    """Groups other than bad_group (n, t, g) within rel * range / 2; bad_group entirely NaN."""
    g, g_hat = groups_of(x.float(), granularity), groups_of(x_hat, granularity)
    n, t, gi = bad_group
    assert torch.isnan(g_hat[n, t, gi]).all()
    keep = torch.ones(g.shape[:3], dtype=torch.bool)
    keep[n, t, gi] = False
    bound = rel * (g.amax(-1) - g.amin(-1)) / 2
    err = (g_hat - g).abs()
    assert torch.isfinite(g_hat[keep]).all()
    assert (err[keep] <= bound[keep][:, None] * (1 + 1e-6) + 1e-30).all()


@pytest.mark.parametrize("granularity", ["token", "token_head"])
@pytest.mark.parametrize("bad", BAD)
def test_a_non_finite_value_spoils_only_its_own_group(granularity, bad):
    torch.manual_seed(0)
    cfg = KVCompConfig(granularity=granularity)
    k, v = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    k[1, 1, 5, 3] = bad
    v[0, 0, 40, 7] = bad
    enc, fmt = codec.encode_blocks(k, v, cfg)
    k_hat, v_hat = codec.decode_blocks(enc, fmt)
    g = 0 if granularity == "token" else 1
    check_bound_and_nan(k, k_hat, cfg.rel_k, granularity, (1, 5, g))
    check_bound_and_nan(v, v_hat, cfg.rel_v, granularity, (0, 40, 0))


def test_a_range_that_overflows_float32_is_stored_as_nan():
    torch.manual_seed(1)
    k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    big = torch.finfo(torch.float32).max
    k[0, 0, 9, 0], k[0, 1, 9, 1] = big, -big
    enc, fmt = codec.encode_blocks(k, v, KVCompConfig())
    k_hat, _ = codec.decode_blocks(enc, fmt)
    check_bound_and_nan(k, k_hat, 0.1, "token", (0, 9, 0))


@pytest.mark.parametrize("granularity,repack,pack,dtype", [("token", "median", 8, torch.bfloat16),
                                                           ("token_head", "median", 16, torch.float16),
                                                           ("token_head", "none", 8, torch.float32),
                                                           ("token", "none", 64, torch.bfloat16)])
def test_triton_store_writes_the_codec_bytes_for_non_finite_values(granularity, repack, pack, dtype):
    pytest.importorskip("triton")
    from kvcomp_hf.kernels import encode_blocks_triton

    if torch.cuda.is_available() and dtype == torch.float32:
        pytest.skip("float32 K/V take the PyTorch path on CUDA")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2)
    cfg = KVCompConfig(granularity=granularity, repack=repack, pack_size=pack)
    k, v = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    for i, bad in enumerate(BAD):
        k[i % 2, i % 2, 3 + 20 * i, 5] = bad
        v[(i + 1) % 2, 0, 60 - 7 * i, 2 + i] = bad
    k, v = k.to(dtype).to(device), v.to(dtype).to(device)
    got, _ = encode_blocks_triton(k, v, cfg)
    want, _ = codec.encode_blocks(k, v, cfg)
    for name in ("seg_offset", "seg_bytes", "perm", "data"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), name
    for name in ("token_min", "token_step"):  # NaN where the group is not finite
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name).cpu(), rtol=0, atol=0,
                                   equal_nan=True)
