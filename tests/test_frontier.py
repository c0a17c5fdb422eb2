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

    # calibrate --from-frontier: the fewest bits within budget among the kvcomp configs (not the edge lever)
    preset = tmp_path / "tiny.yaml"
    calibrate.main(["--from-frontier", str(out / "perplexity.json"), "--max-nll-increase", "10", "--name", "tiny",
                    "--model-id", "tiny/random", "--output", str(preset)])
    doc = yaml.safe_load(preset.read_text())
    kv = {s: res["results"][s]["bits_per_value"] for s in SPECS if s.startswith("kvcomp") and "|" not in s}
    best = min(kv, key=kv.get)
    assert doc["calibrated"] is True and doc["model"] == "tiny/random"
    assert doc["config"] == common.parse_cache_spec(best).kvcomp_config().to_dict()
    assert doc["provenance"]["measured"]["chosen"]["bits_per_value"] == pytest.approx(kv[best], abs=1e-3)
    assert doc["provenance"]["measured_by"]["command"] == "measured elsewhere"
    with pytest.raises(ValueError, match="NLL increase"):
        calibrate.main(["--from-frontier", str(out / "perplexity.json"), "--max-nll-increase", "-1",
                        "--output", str(tmp_path / "none.yaml")])
