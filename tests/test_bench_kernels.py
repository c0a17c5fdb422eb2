"""eval.bench_kernels' per-shape run on the CPU (Triton's interpreter, tiny context), so the H200 benchmark's
plumbing (store into a BlockStore, fused decode, its correctness spot check, variants, roofline) is checked before
device time is spent on it. Timings are replaced by a stub: only the structure and the error are asserted."""

import pytest

from eval import bench_kernels
from kvcomp_hf.config import KVCompConfig


@pytest.mark.parametrize("config", [{}, {"preset": "fast"}, {"layout": "fixed_v", "rel_v": 1 / 3}],
                         ids=["default", "fast", "fixed_v"])
def test_run_one_stores_decodes_and_checks_itself(monkeypatch, config):
    calls = []

    def fake_bench(fn):
        fn()
        calls.append(fn)
        return 1.0

    monkeypatch.setattr(bench_kernels, "bench", fake_bench)
    cfg = KVCompConfig.from_dict(config)
    row = bench_kernels.run_one("smollm2", 128 + 2 * 64 + 5, 2, cfg, bw=1e12, dev="cpu", variants=("sv0",))
    assert row["compressed_blocks"] == 2 and row["tail"] == 128 + 5
    assert row["rel_err_vs_dequant_sdpa"] < 1e-2              # the fused kernel against SDPA on the decoded cache
    assert 2 < row["bits_per_value"] < 16 and row["bits_per_value_segments_only"] < row["bits_per_value"]
    assert row["variants_ms"] == {"sv0": 1.0} and row["speedup_vs_sdpa"] == 1.0
    assert "fused_graph_ms" not in row  # CUDA graph timing only on a GPU
    assert row["compressed_bytes_read"] < row["dense_bytes_read"]
    assert len(calls) >= 6  # store, fused, variant, SDPA, two cuBLAS products
