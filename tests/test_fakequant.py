"""eval/fakequant.py (one-pass fake quantisation) against teacher forcing through the real cache, and
eval/calibrate.py --quick, on a tiny random model."""

import pytest
import yaml

from eval import calibrate, common, fakequant, perplexity

SPECS = ["kvcomp:rel_k=0.5,rel_v=0.5,sink_tokens=0", "kvcomp:rel_k=0.5,rel_v=0.5,rotation=hadamard,granularity=token_head,sink_tokens=0",
         "kvcomp:rel_k=0.9,rel_v=0.9,sink_tokens=4"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return common.build_tiny_model(tmp_path_factory.mktemp("tiny_fq"))


def _both(tiny_dir, dtype):
    model, tok = common.load_model(str(tiny_dir), device="cpu", dtype=dtype)
    _, text = common.load_text("pydoc")
    ids = perplexity.token_windows(tok, text, 400, 1)[0]
    specs = [common.parse_cache_spec(s) for s in ["full"] + SPECS]
    real = perplexity.summarise([perplexity.evaluate_window(model, ids, specs, chunk=64)], ["full"] + SPECS)
    return real, fakequant.evaluate(model, [ids], SPECS, bits_at=400, log=lambda *a: None)


def test_fakequant_matches_the_cache_in_64_token_chunks(tiny_dir):
    """Same KL, NLL change and top-1 agreement as eval/perplexity.py --chunk 64 over the real cache (float32,
    where rounding noise does not hide the quantisation), sink tokens included, and the same bits/value (bf16:
    the bytes of a 16-bit deployment)."""
    real, fake = _both(tiny_dir, "float32")
    for spec in SPECS:
        r, f = real[spec], fake[spec]
        assert r["kl"] > 3e-4  # the setting is lossy enough to compare
        assert abs(f["kl"] - r["kl"]) < 0.1 * r["kl"], (spec, f["kl"], r["kl"])
        assert abs(f["delta_nll"] - r["delta_nll"]) < 0.15 * max(abs(r["delta_nll"]), r["kl"]), spec
        assert abs(f["top1_agreement"] - r["top1_agreement"]) < 0.02
    real, fake = _both(tiny_dir, "bfloat16")
    for spec in SPECS:
        assert abs(fake[spec]["bits_per_value"] - real[spec]["bits_per_value"]) < 0.01 * real[spec]["bits_per_value"]


def test_fakequant_levers_cost_bits(tiny_dir):
    model, tok = common.load_model(str(tiny_dir), device="cpu", dtype="float32")
    _, text = common.load_text("pydoc")
    ids = perplexity.token_windows(tok, text, 300, 1)[0]
    base = "kvcomp:rel_k=0.2,rel_v=0.3,rotation=hadamard,sink_tokens=0"
    res = fakequant.evaluate(model, [ids], [base, base + "|sink=4", base + "|edge=1*0.5"], bits_at=1024,
                             log=lambda *a: None)
    assert res[base + "|sink=4"]["bits_per_value"] > res[base]["bits_per_value"]
    assert res[base + "|edge=1*0.5"]["bits_per_value"] > res[base]["bits_per_value"]
    with pytest.raises(ValueError, match="edge=N"):
        fakequant.parse_scheme(base + "|tight=2")


def test_calibrate_quick_writes_a_preset(tiny_dir, tmp_path):
    out = tmp_path / "quick.yaml"
    args = calibrate.parse_args(["--quick", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32",
                                 "--ppl-tokens", "300", "--ppl-windows", "1", "--max-nll-increase", "0.5",
                                 "--output", str(out), "--name", "tiny", "--bits-at", "1024"])
    result = calibrate.run(args)
    doc = yaml.safe_load(out.read_text())
    assert doc["calibrated"] is True and doc["config"]["rotation"] == "hadamard"
    chosen = result["results"][result["chosen"]]
    # the fewest bits among the configs within budget
    ok = [r["bits_per_value"] for r in result["results"].values() if r["delta_nll"] <= 0.5]
    assert chosen["bits_per_value"] == min(ok)
    assert doc["provenance"]["measured"]["chosen"]["delta_nll"] <= 0.5
    assert "--quick" in doc["provenance"]["method"]


def test_a_bad_spec_fails_before_the_model_loads(monkeypatch):
    """All specs are parsed first: a typo in the last one must not cost the runs of the ones before it."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the specs were checked")

    monkeypatch.setattr(common, "load_model", no_model)
    with pytest.raises(ValueError, match="pack_size must be one of"):
        fakequant.main(["--specs", "kvcomp:rel_k=0.1;kvcomp:pack_size=32"])
