"""eval/frontier.py (every spec in turn against one reference pass) and eval/calibrate.py --from-frontier, on a
tiny random model."""

import json

import pytest
import yaml

from eval import calibrate, common, frontier, perplexity

SPECS = ["kvcomp:rel_k=0.5,rel_v=0.5,sink_tokens=0", "kvcomp:rel_k=0.3,rel_v=0.3,sink_tokens=4", "kivi4",
         "kvcomp:rel_k=0.5,rel_v=0.5,sink_tokens=0|edge=1*0.5"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return common.build_tiny_model(tmp_path_factory.mktemp("tiny_frontier"))


def test_frontier_equals_perplexity_and_merges_without_rerunning(tiny_dir, tmp_path):
    out = tmp_path / "fr"
    args = ["--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--tokens", "300", "--windows", "1",
            "--text", "pydoc", "--caches", ";".join(SPECS), "--out", str(out), "--no-plot"]
    frontier.main(args)
    res = json.loads((out / "perplexity.json").read_text())
    assert res["caches"] == ["full"] + SPECS and not res["failed"]
    # the same numbers as eval/perplexity.py teacher-forcing the spec beside the full cache
    model, tok = common.load_model(str(tiny_dir), device="cpu", dtype="float32")
    _, text = common.load_text("pydoc", min_words=300, order=common.PERPLEXITY_ORDER)
    ids = perplexity.token_windows(tok, text, 300, 1)[0]
    specs = [common.parse_cache_spec(s) for s in ["full"] + SPECS[:3]]
    want = perplexity.summarise([perplexity.evaluate_window(model, ids, specs, chunk=64)], ["full"] + SPECS[:3])
    for spec in SPECS[:3]:
        got = res["results"][spec]
        assert got["delta_nll"] == pytest.approx(want[spec]["delta_nll"], abs=1e-6)
        assert got["kl"] == pytest.approx(want[spec]["kl"], abs=1e-6)
        assert got["cache_report"]["tokens"] == 300  # the cache holds the whole window when its bits are counted
    assert res["results"][SPECS[3]]["bits_per_value"] > res["results"][SPECS[0]]["bits_per_value"]  # tighter edges
    # a merge runs nothing: the spec files stay as they are
    stamps = {f: f.stat().st_mtime_ns for f in out.glob("spec_*.json")}
    frontier.main(args + ["--merge-only", "--run-command", "measured elsewhere"])
    assert {f: f.stat().st_mtime_ns for f in out.glob("spec_*.json")} == stamps
    merged = json.loads((out / "perplexity.json").read_text())
    assert merged["meta"]["command"] == "measured elsewhere" and merged["results"] == res["results"]

    # calibrate --from-frontier: the fewest bits within budget among the kvcomp configs (not the edge lever);
    # bits within 0.01 of each other count as equal, and the more accurate of those wins
    preset = tmp_path / "tiny.yaml"
    calibrate.main(["--from-frontier", str(out / "perplexity.json"), "--max-nll-increase", "10", "--name", "tiny",
                    "--model-id", "tiny/random", "--output", str(preset)])
    doc = yaml.safe_load(preset.read_text())
    kv = {s: res["results"][s]["bits_per_value"] for s in SPECS if s.startswith("kvcomp") and "|" not in s}
    fewest = min(kv.values())
    equal = [s for s in kv if round(kv[s], 2) == round(fewest, 2)]
    best = min(equal, key=lambda s: res["results"][s]["delta_nll"])
    assert doc["calibrated"] is True and doc["model"] == "tiny/random"
    assert doc["config"] == common.parse_cache_spec(best).kvcomp_config().to_dict()
    assert doc["provenance"]["measured"]["chosen"]["bits_per_value"] == pytest.approx(kv[best], abs=1e-3)
    assert doc["provenance"]["measured_by"]["command"] == "measured elsewhere"
    with pytest.raises(ValueError, match="NLL increase"):
        calibrate.main(["--from-frontier", str(out / "perplexity.json"), "--max-nll-increase", "-1",
                        "--output", str(tmp_path / "none.yaml")])


def test_calibrate_from_several_runs_keeps_the_budget_in_every_run(tmp_path):
    """--from-frontier over two texts: a config passes only within budget in both; a cache's name as the budget
    means its NLL increase in each run; the preset reports the chosen config's numbers per run."""
    small, mid, big = ("kvcomp:rel_k=0.2,rel_v=0.3", "kvcomp:rel_k=0.1,rel_v=0.2", "kvcomp:rel_k=0.05,rel_v=0.1")

    def run(name, rows):
        path = tmp_path / f"{name}.json"
        results = {c: {"bits_per_value": b, "delta_nll": n, "kl": n, "top1_agreement": 0.9}
                   for c, (b, n) in rows.items()}
        path.write_text(json.dumps({"suite": "perplexity", "text": name, "results": results,
                                    "meta": {"command": f"frontier {name}", "device": "cpu"}}))
        return str(path)

    a = run("pydoc", {small: (3.0, 0.004), mid: (3.5, 0.003), big: (4.5, 0.001), "kivi4": (5.0, 0.005)})
    b = run("cfi", {small: (3.1, 0.006), mid: (3.6, 0.002), big: (4.6, 0.001), "kivi4": (5.0, 0.004)})
    preset = tmp_path / "p.yaml"
    calibrate.main(["--from-frontier", f"{a},{b}", "--max-nll-increase", "kivi4", "--output", str(preset)])
    doc = yaml.safe_load(preset.read_text())
    assert doc["config"] == common.parse_cache_spec(mid).kvcomp_config().to_dict()  # small fails on cfi
    assert [m["delta_nll"] for m in doc["provenance"]["measured"]["chosen"]] == [0.003, 0.002]
    assert [m["command"] for m in doc["provenance"]["measured_by"]] == ["frontier pydoc", "frontier cfi"]
    calibrate.main(["--from-frontier", a, "--max-nll-increase", "kivi4", "--output", str(preset)])
    assert yaml.safe_load(preset.read_text())["config"]["rel_k"] == 0.2  # pydoc alone lets small through
    with pytest.raises(ValueError, match="hf-int4"):
        calibrate.main(["--from-frontier", a, "--max-nll-increase", "hf-int4", "--output", str(preset)])
    with pytest.raises(ValueError, match="only with --from-frontier"):
        calibrate.main(["--max-nll-increase", "kivi4", "--output", str(preset)])


def test_targets_compare_baselines_with_kvcomp_front_at_equal_nll(tmp_path):
    from eval import make_results, plot_frontier
    from kvcomp_hf import KVCompConfig

    def r(bits, nll):
        return {"bits_per_value": bits, "delta_nll": nll, "kl": nll, "top1_agreement": 0.9}

    default = f"kvcomp:rel_k={KVCompConfig().rel_k}"  # any spec that names the default config
    results = {default: r(3.0, 0.02), "kvcomp:rel_k=0.05,rel_v=0.1": r(4.0, 0.004),
               "kvcomp:rel_k=0.1,rel_v=0.1": r(4.5, 0.03),  # beaten on both by the default: not on the front
               "kvcomp:fast": r(4.1, 0.005),  # a preset: within 0.01 nats but over 3.8 bits
               "kvcomp:rel_k=0.5,rel_v=0.5|edge=1*0.5": r(1.0, 0.0),  # a lever, not a config: left out
               "kivi4": r(5.0, 0.012), "hf-int2": r(2.0, 3.0), "hf-int4": r(4.0, 0.025)}
    t = frontier.targets(results)
    assert t["kvcomp_front"] == [(3.0, 0.02), (4.0, 0.004)]
    base = {b["cache"]: b for b in t["baselines"]}
    # kivi4's 0.012 nats is halfway along the front: 3.5 bits, 30% fewer than 5.0
    assert base["kivi4"]["kvcomp_bits_at_nll"] == pytest.approx(3.5)
    assert base["kivi4"]["fewer_bits"] == pytest.approx(0.3)
    assert base["kivi4"]["kvcomp_nll_at_bits"] is None  # 5 bits: past the last kvcomp config, no extrapolation
    assert base["hf-int2"]["kvcomp_bits_at_nll"] is None and base["hf-int2"]["fewer_bits"] is None
    # hf-int4 loses more than kvcomp's cheapest config (3.0 bits at 0.02) at more bits: at most 3.0, >= 25% fewer
    assert base["hf-int4"]["kvcomp_bits_at_most"] and base["hf-int4"]["fewer_bits"] == pytest.approx(0.25)
    assert not base["kivi4"]["kvcomp_bits_at_most"] and not base["hf-int2"]["kvcomp_bits_at_most"]
    assert {row["key"]: row["met"] for row in t["rows"]} == {"default": True, "kvcomp:fast": False, "kivi4": True,
                                                            "hf-int4": True, "stretch": False}

    path = tmp_path / "perplexity.json"
    path.write_text(json.dumps({"suite": "perplexity", "caches": list(results), "results": results,
                                "families": {s: "f" for s in results}, "targets": t}))
    assert plot_frontier.y_scale("NLL increase (nats)", [0.0, 0.004, 3.0]) == "symlog"  # hf-int2 beside kvcomp
    assert plot_frontier.y_scale("NLL increase (nats)", [0.0, 0.002, 0.0077]) == "linear"  # within one order
    assert plot_frontier.y_scale("top-1 agreement (%)", [27.7, 95.0]) == "linear"
    fronts = [s for s in plot_frontier.series_from(path, "delta_nll,kl") if s["label"] == "kvcomp Pareto front"]
    assert len(fronts) == 1 and [list(p[:2]) for p in fronts[0]["points"]] == [list(p) for p in t["kvcomp_front"]]
    # RESULTS.md's generated part shows a frontier run with its families, part columns and target check
    page = make_results.render(tmp_path)
    assert "### Targets of issue 12" in page and "| kivi4 | f | 5.000 |" in page and "\\|edge=1*0.5" in page


def test_integer_tail_lever_quantises_arriving_tokens_and_counts_them_at_that_width(tiny_dir):
    """|tail=8: the tail holds each token on its (token, head) 8-bit grid (the sinks exact), the blocks are
    compressed from those values, and the tail's bytes are counted at 8 bits plus a 16-bit min and scale."""
    import torch

    from kvcomp_hf import cache_kwargs

    model, _ = common.load_model(str(tiny_dir), device="cpu", dtype="float32")
    ids = torch.randint(3, 200, (1, 300))
    plain_spec = "kvcomp:rel_k=0.1,rel_v=0.1,sink_tokens=4"
    reports, tails = {}, {}
    for spec in (plain_spec, plain_spec + "|tail=8"):
        cache = frontier.make_cache(spec, model, "torch")
        with torch.no_grad():
            for s in range(0, 300, 64):
                model(input_ids=ids[:, s:s + 64], use_cache=True, **cache_kwargs(cache))
        reports[spec], tails[spec], n_layers = cache.memory_report(), cache.layers[0].keys, len(cache.layers)
    plain, integer = reports.values()
    tail = tails[plain_spec + "|tail=8"]
    b, h, t, d = tail.shape
    assert t > 64 and integer["k"]["parts"]["tail"] == n_layers * b * h * (4 * d * 4 + (t - 4) * (d * 8 + 32) // 8)
    assert integer["bits_per_value"] < plain["bits_per_value"]
    lo, hi = tail.amin(-1, keepdim=True), tail.amax(-1, keepdim=True)
    steps = (tail - lo) / ((hi - lo) / 255)
    assert torch.allclose(steps[:, :, 4:], steps[:, :, 4:].round(), atol=1e-3)  # on the 8-bit grid
    assert not torch.allclose(steps[:, :, :4], steps[:, :, :4].round(), atol=1e-3)  # the sinks stay exact
    with pytest.raises(ValueError, match="tail=B"):
        frontier.split_levers("kvcomp:rel_k=0.1|tail=16")
