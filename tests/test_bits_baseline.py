"""Bits/value in the eval tables: every cache of a run against the same baseline, the run's K/V dtype (a float32
CPU run counts the full cache at 32 bits, as it counts kvcomp's float32 tail), and the table header says which."""

import pytest
import torch

import kvcomp_hf
from eval import common, longbench, lm_eval_model, make_results, perplexity, synthetic


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    return common.load_model(str(common.build_tiny_model(tmp_path_factory.mktemp("tiny_bits"))), device="cpu",
                             dtype="float32")


def test_full_and_compressed_caches_share_the_float32_baseline(tiny_fp32):
    model, tok = tiny_fp32
    _, text = common.load_text("pydoc")
    ids = perplexity.token_windows(tok, text, 400, 1)[0]
    specs = common.parse_cache_list("full,kvcomp,kivi4")
    res = perplexity.summarise([perplexity.evaluate_window(model, ids, specs, chunk=64)], [s.name for s in specs])
    assert res["full"]["bits_per_value"] == 32
    report = res["kvcomp"]["cache_report"]
    # the table's ratio full / kvcomp is the compression memory_report measured
    assert res["full"]["bits_per_value"] / res["kvcomp"]["bits_per_value"] == pytest.approx(
        report["compression_ratio"], rel=1e-6)
    assert res["kivi4"]["bits_per_value"] < 32
    header = perplexity.markdown(res, ["full", "kvcomp"], common.kv_dtype(model)).splitlines()[0]
    assert "bits/value (float32 K/V: full = 32)" in header


def test_estimates_and_plain_caches_use_the_model_dtype(tiny_fp32):
    model, tok = tiny_fp32
    assert common.kv_dtype(model) == "float32" and common.kv_bits(model) == 32
    assert common.cache_bits_per_value(None, model) == 32 and common.cache_bits_per_value("full", model) == 32
    assert common.cache_bits_per_value("hf-int4", model) == pytest.approx(4 + 2 * 32 / 64)
    assert common.cache_bits_per_value("kivi2", model, tokens=100) == 32  # all residual at 100 tokens
    _, info = common.greedy_generate(model, tok, [5, 6, 7, 8], 3, "full")
    assert info["cache"]["bits_per_value"] == 32
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), use_cache=True, **kvcomp_hf.cache_kwargs(cache))
    assert common.cache_report(cache)["bits_per_value"] == 32
    bf16 = model.to(torch.bfloat16)
    try:
        assert common.cache_bits_per_value(None, bf16) == 16 and common.bits_header("bfloat16").endswith("full = 16)")
    finally:
        model.to(torch.float32)


def test_every_table_names_its_baseline():
    header = common.bits_header("float32")
    agg = {"scores": {"full": {"4096": {"passkey": 100.0, "avg": 100.0}}}, "bits_per_value": {"full": {"4096": 32}}}
    assert header in synthetic.markdown_table(agg, ["full"], ["passkey"], [4096], "float32")
    lb = {"benchmark": "longbench", "caches": ["full"], "scores": {"full": {"qasper": 10.0}}, "averages": {},
          "bits_per_value": {"full": 32.0}, "tasks": ["qasper"], "kv_dtype": "float32", "max_length": 100,
          "n_samples": {"full": {"qasper": 1}}}
    assert f"| {header} | 32.00 |" in longbench.render_markdown(lb)
    lm = {"model": "m", "caches": ["full"], "results": {"full": {"t": {"acc": 0.5}}}, "bits_per_value": {"full": 32},
          "kv_dtype": "float32"}
    assert f"| {header} | 32.00 |" in lm_eval_model.render_markdown(lm)
    generic = {"suite": "s", "model": "m", "results": {"full": {"score": 1.0, "bits_per_value": 32}},
               "kv_dtype": "float32"}
    assert header in make_results.section_generic(generic, make_results.Path("s.json"), make_results.Path("."))
    assert "full = 16 by convention" not in make_results.render(make_results.Path("/nonexistent"))
