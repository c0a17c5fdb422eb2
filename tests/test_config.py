import dataclasses

import pytest

import kvcomp_hf
from kvcomp_hf.config import KVCompConfig, load_preset, load_preset_file, resolve_config


def test_defaults_are_valid_and_frozen():
    cfg = KVCompConfig()
    assert cfg.block_size == 64 and cfg.residual_length >= 0 and cfg.pack_size in (4, 8, 16, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rel_k = 0.5


@pytest.mark.parametrize("field,value,allowed", [
    ("rel_k", 0.0, "rel_k"), ("rel_k", -1, "rel_k"), ("rel_v", 2.0, "rel_v"), ("rel_v", float("nan"), "rel_v"),
    ("rel_k", "0.1", "rel_k"), ("rel_k", True, "rel_k"),
    ("block_size", 32, "block_size must be 64"),
    ("residual_length", -1, ">= 0"), ("residual_length", 200.0, "residual_length"),
    ("sink_tokens", -1, "[0, 64]"), ("sink_tokens", 65, "[0, 64]"), ("sink_tokens", 4.0, "sink_tokens"),
    ("pack_size", 5, "(4, 8, 16, 64)"), ("pack_size", 32, "(4, 8, 16, 64)"),
    ("repack", "greedy", "('none', 'median')"),
    ("granularity", "channel", "('token', 'token_head')"),
    ("layout", "fixed-v", "('packed', 'fixed', 'fixed_v')"),
])
def test_bad_values_name_the_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as err:
        KVCompConfig(**{field: value})
    assert field in str(err.value) and allowed in str(err.value)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown KVCompConfig field"):
        KVCompConfig.from_dict({"rel_q": 0.1})


def test_presets_load_and_override():
    assert "default" in kvcomp_hf.available_presets()
    assert "smollm2-135m-instruct" in kvcomp_hf.available_presets()
    base = load_preset("smollm2-135m-instruct")
    assert isinstance(base, KVCompConfig)
    cfg = resolve_config({"preset": "smollm2-135m-instruct", "rel_v": 0.3})
    assert cfg.rel_v == 0.3 and cfg.rel_k == base.rel_k
    assert kvcomp_hf.preset("default") == load_preset("default").to_dict()
    assert resolve_config("default") == load_preset("default")


def test_every_shipped_preset_is_valid():
    for name in kvcomp_hf.available_presets():
        assert isinstance(load_preset(name), KVCompConfig)


@pytest.mark.parametrize("name", ["no-such-model", "../etc/passwd", "", None])
def test_unknown_preset_names_fail_clearly(name):
    with pytest.raises(ValueError, match="preset"):
        load_preset(name)


def test_bad_preset_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("config: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_preset_file(bad_yaml)
    no_config = tmp_path / "noconfig.yaml"
    no_config.write_text("rel_k: 0.1\n")
    with pytest.raises(ValueError, match="'config:' mapping"):
        load_preset_file(no_config)
    bad_value = tmp_path / "badvalue.yaml"
    bad_value.write_text("config:\n  rel_k: 0.1\n  pack_size: 7\n")
    with pytest.raises(ValueError, match="pack_size") as err:
        load_preset_file(bad_value)
    assert "badvalue.yaml" in str(err.value)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("config: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_preset_file(unsafe)


def test_default_config_is_the_default_preset_and_uncalibrated_presets_take_it():
    """configs/default.yaml and KVCompConfig() stay one config; model presets not calibrated on their model use it
    (presets without a model, such as "fast", are layouts of their own)."""
    import yaml

    from kvcomp_hf.config import CONFIGS_DIR

    assert load_preset("default") == KVCompConfig()
    for path in CONFIGS_DIR.glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        if doc.get("model") and not doc.get("calibrated"):
            assert load_preset(path.stem) == KVCompConfig(), path.name


@pytest.mark.parametrize("field,value", [("pack_size", 16.0), ("pack_size", 8.5), ("block_size", 64.0),
                                         ("residual_length", 128.0), ("pack_size", "16")])
def test_integer_fields_refuse_floats_and_strings(field, value):
    with pytest.raises(ValueError, match=field):
        KVCompConfig(**{field: value})


def test_numpy_numbers_are_accepted_as_python_numbers():
    np = pytest.importorskip("numpy")
    for rel in (np.float32(0.1), np.float64(0.1), np.float16(0.25)):
        cfg = KVCompConfig(rel_k=rel)
        assert type(cfg.rel_k) is float and cfg.rel_k == pytest.approx(float(rel))
    cfg = KVCompConfig(pack_size=np.int64(8), residual_length=np.int32(256))
    assert (cfg.pack_size, cfg.residual_length) == (8, 256) and type(cfg.pack_size) is int
    with pytest.raises(ValueError, match="rel_v"):
        KVCompConfig(rel_v=np.float32("nan"))


@pytest.mark.parametrize("cache_config", [["rel_k", 0.1], 0.1, 0, [], ("rel_k", 0.1)])
def test_cache_config_that_is_not_a_mapping_fails_clearly(cache_config, tiny_llama):
    import torch

    with pytest.raises(ValueError, match="cache_config must be a dict"):
        resolve_config(cache_config)
    with pytest.raises(ValueError, match="cache_config must be a dict"):
        tiny_llama.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=1, cache_implementation="kvcomp",
                            cache_config=cache_config)


def test_mappings_other_than_dict_are_accepted():
    from types import MappingProxyType

    assert resolve_config(MappingProxyType({"rel_v": 0.3})).rel_v == 0.3


def test_presets_that_name_themselves_fail_clearly(tmp_path, monkeypatch):
    import kvcomp_hf.config as config_module

    (tmp_path / "loop.yaml").write_text("config:\n  preset: loop\n")
    (tmp_path / "ping.yaml").write_text("config:\n  preset: pong\n")
    (tmp_path / "pong.yaml").write_text("config:\n  preset: ping\n  rel_k: 0.2\n")
    (tmp_path / "child.yaml").write_text("config:\n  preset: default\n  rel_v: 0.3\n")
    monkeypatch.setattr(config_module, "_preset_dirs", lambda: [tmp_path, config_module.CONFIGS_DIR])
    with pytest.raises(ValueError, match="names itself: loop -> loop"):
        load_preset("loop")
    with pytest.raises(ValueError, match="names itself: ping -> pong -> ping"):
        load_preset("ping")
    assert load_preset("child").rel_v == 0.3  # a preset may start from another one


def test_head_dim_the_format_cannot_take_fails_when_the_cache_is_built():
    from helpers import tiny_llama_config

    with pytest.raises(ValueError, match="head_dim must be a multiple of 8.*got 12"):
        kvcomp_hf.KVCompCache(tiny_llama_config(head_dim=12))
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8.*got 20"):
        kvcomp_hf.KVCompCache(tiny_llama_config(head_dim=None, hidden_size=80, num_attention_heads=4))


def test_triton_backend_without_a_gpu_fails_when_the_cache_is_built():
    import torch
    from helpers import tiny_llama_config

    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="power-of-two head_dim"):
            kvcomp_hf.KVCompCache(tiny_llama_config(head_dim=24), backend="triton")
    else:
        with pytest.raises(ValueError, match="backend='triton' needs a CUDA GPU"):
            kvcomp_hf.KVCompCache(tiny_llama_config(), backend="triton")


@pytest.mark.parametrize("layout", ["fixed", "fixed_v"])
def test_fixed_layouts_need_whole_channels_and_at_most_7_bits(layout):
    from kvcomp_hf.codec import BlockFormat

    with pytest.raises(ValueError, match=f"layout='{layout}'.*pack_size=64 and repack='none'.*pack_size=16"):
        KVCompConfig(layout=layout, pack_size=16)
    with pytest.raises(ValueError, match=f"layout='{layout}' stores at most 7 bits.*rel_k=0.003 needs 9"):
        BlockFormat.from_config(KVCompConfig(layout=layout, rel_k=0.003), 2, 16)
    fmt = BlockFormat.from_config(KVCompConfig(layout=layout), 2, 16)
    assert fmt.fixed(1) and fmt.fixed(0) == (layout == "fixed") and fmt.meta_bytes(1) == 0


def test_auto_layout_stores_fixed_v_where_it_can_else_packed():
    from kvcomp_hf.codec import BlockFormat

    assert KVCompConfig().layout == "auto" and KVCompConfig().storage_layout == "fixed_v"
    assert BlockFormat.from_config(KVCompConfig(), 2, 16).layout == "fixed_v"
    # other packs, or rels wider than the fixed fields' 7 bits: packed (the same quantised values)
    assert KVCompConfig(pack_size=16, repack="median").storage_layout == "packed"
    assert KVCompConfig(repack="median").storage_layout == "packed"
    assert KVCompConfig(rel_k=1e-3).storage_layout == "packed"
    assert KVCompConfig(rel_v=1e-3).storage_layout == "packed"
    assert dataclasses.replace(KVCompConfig(), pack_size=8).storage_layout == "packed"
    assert KVCompConfig(layout="packed").storage_layout == "packed"
    assert KVCompConfig(layout="fixed").storage_layout == "fixed"
    with pytest.raises(ValueError, match="layout must be 'auto' or one of"):
        KVCompConfig(layout="fixed-v")
