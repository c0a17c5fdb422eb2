"""eval/perplexity.py (teacher forcing through the cache) and eval/calibrate.py on a tiny random model."""

import json

import pytest
import torch
import yaml

from eval import calibrate, common, perplexity



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return common.build_tiny_model(tmp_path_factory.mktemp("tiny_ppl"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return common.load_model(str(tiny_dir), device="cpu", dtype="float32")


def test_token_windows(tiny):
    _, tok = tiny
    _, text = common.load_text("pydoc")
    w = perplexity.token_windows(tok, text, 300, 3)
    assert len(w) == 3 and all(len(x) == 300 for x in w)
    assert w[0] != w[1]
    with pytest.raises(ValueError):
        perplexity.token_windows(tok, "few words only", 300, 1)


def test_full_cache_chunking_matches_one_forward(tiny):
    model, tok = tiny
    _, text = common.load_text("pydoc")
    ids = perplexity.token_windows(tok, text, 200, 1)[0]
    specs = [common.parse_cache_spec("full")]
    a = perplexity.evaluate_window(model, ids, specs, chunk=200)
    b = perplexity.evaluate_window(model, ids, specs, chunk=17)
    c = perplexity.evaluate_window(model, ids[:40], specs, chunk=1)
    torch.testing.assert_close(a["nll"]["full"], b["nll"]["full"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a["nll"]["full"][:39], c["nll"]["full"], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    ref = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="none")
    torch.testing.assert_close(a["nll"]["full"].float(), ref, rtol=1e-4, atol=1e-4)


def test_compressed_caches_differ_only_after_their_residual(tiny):
    model, tok = tiny
    _, text = common.load_text("pydoc")
    ids = perplexity.token_windows(tok, text, 400, 1)[0]
    specs = common.parse_cache_list("full,kivi2,kvcomp:rel_k=0.3,rel_v=0.4")
    w = perplexity.evaluate_window(model, ids, specs, chunk=32)
    assert w["kl"]["full"].abs().max() < 1e-6 and w["top1"]["full"].all()
    for name in ("kivi2", "kvcomp:rel_k=0.3,rel_v=0.4"):
        # the first chunks attend to uncompressed K/V only: identical to the full cache
        assert w["kl"][name][:96].abs().max() < 1e-5
        assert w["kl"][name][256:].mean() > 1e-6
        assert (w["kl"][name] > -1e-6).all()
    res = perplexity.summarise([w], [s.name for s in specs])
    assert res["full"]["delta_nll"] == 0 and res["full"]["top1_agreement"] == 1
    assert res["kivi2"]["bits_per_value"] < 32
    assert len(res["kivi2"]["by_position"]) == 4
    assert res["kvcomp:rel_k=0.3,rel_v=0.4"]["bits_per_value"] > 0


def test_perplexity_cli(tiny_dir, tmp_path):
    out = tmp_path / "ppl"
    perplexity.main(["--model", str(tiny_dir), "--caches", "kivi4", "--tokens", "300", "--chunk", "64",
                     "--text", "pydoc", "--out", str(out), "--device", "cpu"])
    res = json.loads((out / "perplexity.json").read_text())
    assert res["caches"] == ["full", "kivi4"]  # full added as the reference
    assert res["results"]["full"]["perplexity"] > 1
    assert "kivi4" in (out / "perplexity.md").read_text()
    # the results page and the frontier plot read it back
    from eval import make_results, plot_frontier

    make_results.main(["--results", str(tmp_path), "--out", str(tmp_path / "RESULTS.md")])
    page = (tmp_path / "RESULTS.md").read_text()
    assert "## Perplexity through the cache" in page and "| kivi4 |" in page and "Command: `" in page
    # regenerating keeps the hand-written text around the generated block
    (tmp_path / "RESULTS.md").write_text("intro\n" + page.split("\n", 2)[2] + "\n## Speed\nby hand\n")
    make_results.main(["--results", str(tmp_path), "--out", str(tmp_path / "RESULTS.md")])
    again = (tmp_path / "RESULTS.md").read_text()
    assert again.startswith("intro\n") and again.endswith("## Speed\nby hand\n") and again.count("| kivi4 |") == 1
    assert plot_frontier.main([str(out / "perplexity.json"), "--out", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_calibrate_writes_preset(tiny_dir, tmp_path):
    out_yaml = tmp_path / "tiny.yaml"
    calibrate.main(["--model", str(tiny_dir), "--model-id", "tiny/random", "--name", "tiny",
                    "--output", str(out_yaml), "--out", str(tmp_path / "work"), "--device", "cpu",
                    "--rel-k", "0.05,0.3", "--rel-v", "0.4", "--ppl-tokens", "300", "--text", "pydoc",
                    "--haystack", "pydoc", "--tasks", "passkey", "--lengths", "320", "--samples", "1",
                    "--budget", "score=100,nll=10"])
    doc = yaml.safe_load(out_yaml.read_text())
    assert doc["calibrated"] is True and doc["model"] == "tiny/random"
    cfg = common.parse_cache_spec("kvcomp").kvcomp_config().from_dict(doc["config"])
    assert cfg.rel_v == 0.4
    assert cfg.rel_k == 0.3  # generous budget: the most compressive grid point wins
    prov = doc["provenance"]
    assert prov["command"] and prov["date"] and prov["data"]["perplexity"]["text"] == "pydoc"
    assert len(prov["grid"]) == 2 and prov["measured"]["chosen"]["bits_per_value"] > 0
    from kvcomp_hf.config import load_preset_file

    assert load_preset_file(out_yaml) == cfg


def test_calibrate_budget_flag():
    a = calibrate.parse_args(["--budget", "score=2,nll=0.05"])
    assert a.max_score_drop == 2 and a.max_nll_increase == 0.05
    with pytest.raises(ValueError):
        calibrate.parse_args(["--budget", "x=1"])
    assert calibrate.within_budget({"4096": 99.5}, {"4096": 100.0}, 1.0)
    assert not calibrate.within_budget({"4096": 98.0}, {"4096": 100.0}, 1.0)
    assert not calibrate.within_budget({}, {"4096": 100.0}, 1.0)
