"""KVCompCache semantics against DynamicCache on a tiny random Llama (no download)."""

import dataclasses
import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kvcomp_hf
from kvcomp_hf import KVCompCache, KVCompConfig
from kvcomp_hf import CACHE_KWARG, cache_kwargs, returned_cache
from kvcomp_hf.attention import kvcomp_attention_forward
from kvcomp_hf.cache import KVCompLayer

from helpers import FakeAttention, rel_err, tiny_llama_config

NEAR_LOSSLESS = KVCompConfig(rel_k=1e-3, rel_v=1e-3)


def test_seq_lengths_mask_sizes_and_attention_match_dynamic_cache(tiny_llama):
    """Prefill + 200 decode steps crossing several block boundaries."""
    config = tiny_llama.config
    ours, ref = KVCompCache(config, NEAR_LOSSLESS), DynamicCache(config=config)
    attn_out = []
    hooks = [layer.self_attn.register_forward_hook(lambda mod, args, out: attn_out.append(out[0]))
             for layer in tiny_llama.model.layers]
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (2, 150))
    with torch.no_grad():
        out_ours = tiny_llama(ids, **cache_kwargs(ours), use_cache=True)
        out_ref = tiny_llama(ids, **cache_kwargs(ref), use_cache=True)
        for step in range(200):
            for layer in range(config.num_hidden_layers):
                assert ours.get_seq_length(layer) == ref.get_seq_length(layer)
                assert ours.get_mask_sizes(1, layer) == ref.get_mask_sizes(1, layer)
            nxt = out_ref.logits[:, -1:].argmax(-1)
            attn_out.clear()
            out_ours = tiny_llama(nxt, **cache_kwargs(ours), use_cache=True)
            out_ref = tiny_llama(nxt, **cache_kwargs(ref), use_cache=True)
            assert rel_err(out_ours.logits, out_ref.logits) < 1e-3
            n = config.num_hidden_layers  # attention-module outputs, layer by layer: ours then dense
            for got, want in zip(attn_out[:n], attn_out[n:]):
                assert rel_err(got, want) < 1e-3
    for hook in hooks:
        hook.remove()
    assert ours.get_seq_length() == 350
    assert ours.layers[0].block_table.shape[1] >= 3  # several blocks compressed along the way
    assert 128 <= ours.layers[0].keys.shape[2] < 128 + 64


@pytest.mark.parametrize("rel,bound,sinks,residual", [(1e-4, 1e-3, 0, 128), (1e-3, 1e-2, 0, 128), (1e-3, 1e-2, 4, 128),
                                                     (1e-3, 1e-2, 0, 0), (1e-3, 1e-2, 4, 64)])
def test_attention_over_compressed_cache_matches_sdpa_on_dense(rel, bound, sinks, residual):
    """Same Gaussian K/V stream into a KVCompLayer and a DynamicLayer, with causal chunks of several
    lengths: attention outputs agree. (Uniform quantisation error on Gaussian data gives a relative
    output error of about rel * range / (2 * sqrt(3) * std), several times rel with K's 8x channel spread.)"""
    torch.manual_seed(2)
    dtype = torch.float32
    b, h, hq, d = 3, 2, 4, 16
    ours = KVCompLayer(KVCompConfig(rel_k=rel, rel_v=rel, sink_tokens=sinks, residual_length=residual))
    ref = DynamicLayer()
    module = FakeAttention(hq // h)
    tails = set()
    for q_len in [300, 1, 1, 64, 1] + [1] * 70 + [17]:
        k = torch.randn(b, h, q_len, d, dtype=dtype) * torch.linspace(0.5, 4, d)
        v = torch.randn(b, h, q_len, d, dtype=dtype)
        hk, hv = ours.update(k, v)
        dk, dv = ref.update(k, v)
        assert hk.shape == dk.shape
        q = torch.randn(b, hq, q_len, d, dtype=dtype)
        kv_len = dk.shape[2]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)[None, None].expand(b, 1, -1, -1)
        got, _ = kvcomp_attention_forward(module, q, hk, hv, mask, scaling=d**-0.5)
        want, _ = sdpa_attention_forward(module, q, dk, dv, mask, scaling=d**-0.5)
        assert rel_err(got, want) < bound
        tails.add(ours.keys.shape[2] - min(sinks, kv_len))
    assert min(tails) == residual and max(tails) == residual + 63  # every tail length from empty to full


def test_decode_queries_on_a_16bit_model_attend_in_float32_over_exact_values():
    """bf16 K/V: decode-sized queries on the PyTorch path are as close to float64 attention over the
    decoded values as bf16 output rounding allows (no extra rounding of the decoded K/V), so they compute
    the same numbers as the fused kernel. A 64-query chunk attends in bf16 and is allowed more error."""
    torch.manual_seed(3)
    b, h, hq, d = 2, 2, 4, 32
    layer = KVCompLayer(KVCompConfig(rel_k=0.05, rel_v=0.1))
    module = FakeAttention(hq // h)
    k = (torch.randn(b, h, 700, d) * torch.linspace(0.5, 4, d)).to(torch.bfloat16)
    v = torch.randn(b, h, 700, d).to(torch.bfloat16)
    layer.update(k, v)
    assert layer.block_table.shape[1] > 0
    for q_len, slack in ((1, 1.05), (16, 1.05), (64, 4.0)):
        k1 = torch.randn(b, h, q_len, d).to(torch.bfloat16)
        hk, hv = layer.update(k1, k1)
        dk, dv = layer.dense_kv(torch.float64)
        q = torch.randn(b, hq, q_len, d).to(torch.bfloat16)
        kv_len = dk.shape[2]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)[None, None].expand(b, 1, -1, -1)
        got, _ = kvcomp_attention_forward(module, q, hk, hv, mask, scaling=d**-0.5)
        exact, _ = sdpa_attention_forward(module, q.double(), dk, dv, mask, scaling=d**-0.5)
        assert got.dtype == torch.bfloat16
        rounding = rel_err(exact.to(torch.bfloat16), exact)
        assert rel_err(got, exact) <= slack * rounding + 1e-6, (q_len, rel_err(got, exact), rounding)


def test_left_padded_batch_equals_rows_alone(tiny_llama):
    torch.manual_seed(3)
    lengths = [260, 200, 131]
    rows = [torch.randint(3, 256, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    cfg = {"rel_k": 1e-4, "rel_v": 1e-4}
    batch = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=80, do_sample=False,
                                cache_implementation="kvcomp", cache_config=cfg, output_logits=True,
                                return_dict_in_generate=True)
    for i, row in enumerate(rows):
        alone = tiny_llama.generate(row[None], max_new_tokens=80, do_sample=False, cache_implementation="kvcomp",
                                    cache_config=cfg, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(batch.sequences[i, width:], alone.sequences[0, len(row):])
        got = torch.stack([step[i] for step in batch.logits])
        want = torch.stack([step[0] for step in alone.logits])
        assert rel_err(got, want) < 1e-3


def test_beam_search_sampling_and_lengths(tiny_llama):
    torch.manual_seed(4)
    ids = torch.randint(3, 256, (2, 220))
    beams_ref = tiny_llama.generate(ids, num_beams=3, max_new_tokens=70, do_sample=False)
    cache = KVCompCache(tiny_llama.config, {"rel_k": 1e-4, "rel_v": 1e-4})
    beams = tiny_llama.generate(ids, num_beams=3, max_new_tokens=70, do_sample=False, **cache_kwargs(cache),
                                return_dict_in_generate=True)
    assert torch.equal(beams.sequences, beams_ref)
    assert cache.get_seq_length() == beams.sequences.shape[1] - 1
    assert cache.layers[0].block_table.shape[0] == 6  # 2 prompts x 3 beams, blocks shared between beams

    sampled = tiny_llama.generate(ids, do_sample=True, top_k=20, max_new_tokens=70, cache_implementation="kvcomp",
                                  return_dict_in_generate=True)
    assert returned_cache(sampled).get_seq_length() == sampled.sequences.shape[1] - 1


def test_assisted_decoding_crops_consistently(tiny_llama):
    torch.manual_seed(5)
    assistant = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval()
    ids = torch.randint(3, 256, (1, 200))
    ref = tiny_llama.generate(ids, max_new_tokens=60, do_sample=False)
    cache = KVCompCache(tiny_llama.config, {"rel_k": 1e-4, "rel_v": 1e-4})
    out = tiny_llama.generate(ids, max_new_tokens=60, do_sample=False, assistant_model=assistant,
                              **cache_kwargs(cache), return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1


@pytest.mark.parametrize("layout", ["fixed", "fixed_v"])
def test_fixed_layout_holds_the_same_values_in_fixed_size_segments(layout):
    """layout="fixed" ("fixed_v": V only) changes only the bit packing: fed the same stream, a fixed and a packed
    layer decode to the same values, and every fixed segment has 8 * D * bits bytes."""
    torch.manual_seed(8)
    cfg = dict(rel_k=1 / 15, rel_v=1 / 7)
    fixed, packed = KVCompLayer(KVCompConfig(layout=layout, **cfg)), KVCompLayer(KVCompConfig(**cfg))
    for q_len in (300, 1, 70, 1):
        k = (torch.randn(2, 2, q_len, 32) * torch.linspace(0.5, 4, 32)).to(torch.bfloat16)
        v = torch.randn(2, 2, q_len, 32).to(torch.bfloat16)
        fixed.update(k, v)
        packed.update(k, v)
    for a, b in zip(fixed.dense_kv(torch.float32), packed.dense_kv(torch.float32)):
        assert torch.equal(a, b)
    store = fixed.store
    assert store.n_slots > 0
    fixed_k = store.seg_bytes[: store.n_slots, 0] == 8 * 32 * 4
    assert fixed_k.all() if layout == "fixed" else torch.equal(store.seg_bytes[: store.n_slots, 0],
                                                                 packed.store.seg_bytes[: store.n_slots, 0])
    assert (store.seg_bytes[: store.n_slots, 1] == 8 * 32 * 3).all()


def test_sink_tokens_stay_exact_and_attention_follows_the_padding_mask():
    """sink_tokens=4: the first 4 tokens are kept exact in the tail (blocks start after them), every other
    token is within the error bound, and the fused kernel (Triton interpreter on the CPU) reads the layer in
    storage order with the padding mask reordered to match: it equals SDPA over the layer in arrival order."""
    torch.manual_seed(11)
    b, h, hq, d, n = 2, 2, 4, 16, 330
    layer = KVCompLayer(KVCompConfig(rel_k=0.2, rel_v=0.3, sink_tokens=4, rotation="none"))
    k = (torch.randn(b, h, n, d) * torch.linspace(0.5, 4, d)).to(torch.bfloat16)
    v = torch.randn(b, h, n, d).to(torch.bfloat16)
    layer.update(k[:, :, :300], v[:, :, :300])
    for t in range(300, n):
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert layer.get_seq_length() == n and layer.block_table.shape[1] == (n - 4 - 128) // 64
    assert torch.equal(layer.keys[:, :, :4], k[:, :, :4])  # the tail starts with the sinks
    dk, dv = layer.dense_kv(torch.float32)  # arrival order
    assert torch.equal(dk[:, :, :4], k[:, :, :4].float()) and torch.equal(dv[:, :, :4], v[:, :, :4].float())
    for x, xh, rel in ((k, dk, 0.2), (v, dv, 0.3)):
        span = (x.float().amax((1, 3)) - x.float().amin((1, 3)))[:, None, :, None]  # per token, all heads
        assert ((xh - x.float()).abs() <= rel * span / 2 + 1e-2).all()
        assert not torch.equal(xh[:, :, 4:200], x[:, :, 4:200].float())  # those are compressed
    q = torch.randn(b, hq, 1, d).to(torch.bfloat16)
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[0, ..., :2] = False   # padding over sinks,
    mask[0, ..., 50:90] = False  # block tokens
    mask[1, ..., n - 100:n - 60] = False  # and tail tokens
    got = layer.attend_fused(q, mask, d**-0.5)  # [B, 1, Hq, D]
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), dk.double(), dv.double(),
                                                            attn_mask=mask, scale=d**-0.5, enable_gqa=True)
    assert rel_err(got.transpose(1, 2), want) < 1e-2
    wrong = torch.nn.functional.scaled_dot_product_attention(q.double(), dk.double(), dv.double(),
                                                             attn_mask=layer.storage_order(mask), scale=d**-0.5,
                                                             enable_gqa=True)
    assert rel_err(got.transpose(1, 2), wrong) > 1e-2  # the reordering matters for this mask


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("new_length", [2, 4, 60, 68, 200, 300, 330])
def test_crop_with_sinks_keeps_the_prefix(sinks, new_length):
    """Crop anywhere (inside the sinks, a block, the tail) keeps exactly the first tokens, in arrival order."""
    torch.manual_seed(12)
    layer = KVCompLayer(KVCompConfig(sink_tokens=sinks))
    k, v = torch.randn(1, 2, 400, 16), torch.randn(1, 2, 400, 16)
    layer.update(k, v)
    dense_k, dense_v = layer.dense_kv()
    layer.crop(new_length - 400)
    assert layer.get_seq_length() == new_length
    k2, v2 = layer.dense_kv()
    assert torch.equal(k2, dense_k[:, :, :new_length]) and torch.equal(v2, dense_v[:, :, :new_length])
    layer.update(k[:, :, :300], v[:, :, :300])  # and grows again from there
    assert layer.get_seq_length() == new_length + 300
    assert torch.equal(layer.dense_kv()[0][:, :, :min(sinks, new_length)], dense_k[:, :, :min(sinks, new_length)])


def test_crop_into_compressed_blocks_reopens_them():
    torch.manual_seed(6)
    layer = KVCompLayer(KVCompConfig())
    k, v = torch.randn(2, 2, 400, 16), torch.randn(2, 2, 400, 16)
    layer.update(k, v)
    dense_k, dense_v = layer.dense_kv()
    assert layer.block_table.shape[1] == 4
    layer.crop(-200)  # cut inside block 3 (tokens 192..255)
    assert layer.get_seq_length() == 200
    assert layer.block_table.shape[1] == 3
    k2, v2 = layer.dense_kv()
    assert torch.equal(k2, dense_k[:, :, :200]) and torch.equal(v2, dense_v[:, :, :200])
    layer.crop(-50)
    assert layer.get_seq_length() == 150 and torch.equal(layer.dense_kv()[0], dense_k[:, :, :150])
    layer.update(k[:, :, :10], v[:, :, :10])
    assert layer.get_seq_length() == 160


@pytest.mark.parametrize("tokens", [-200, -64, -1, 0, 150, 400, 1000, -1000, 1.5, -1.5, "3"])
def test_crop_follows_dynamic_layer_on_the_installed_transformers(tokens):
    """Positive values keep the first N tokens up to transformers 5.19 and raise from 5.20; whatever the
    installed version does with an argument, KVCompLayer does the same: same error type, or same tokens kept."""
    torch.manual_seed(9)
    k, v = torch.randn(2, 2, 400, 16), torch.randn(2, 2, 400, 16)
    ours, ref = KVCompLayer(KVCompConfig()), DynamicLayer()
    ours.update(k, v)
    ref.update(k, v)
    dense_k, _ = ours.dense_kv()
    try:
        ref.crop(tokens)
    except Exception as error:  # noqa: BLE001  (whatever DynamicLayer raises, we must raise too)
        with pytest.raises(type(error)):
            ours.crop(tokens)
        assert ours.get_seq_length() == 400
        return
    ours.crop(tokens)
    assert ours.get_seq_length() == ref.get_seq_length()
    assert torch.equal(ours.dense_kv()[0], dense_k[:, :, :ref.get_seq_length()])


def test_reorder_select_and_repeat_follow_rows():
    torch.manual_seed(7)
    layer = KVCompLayer(KVCompConfig())
    layer.update(torch.randn(3, 2, 300, 16), torch.randn(3, 2, 300, 16))
    k, v = layer.dense_kv()
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    k2, _ = layer.dense_kv()
    assert torch.equal(k2, k[[2, 2, 0]])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.dense_kv()[0], k[[2, 2, 2, 2, 0, 0]])
    layer.batch_select_indices(torch.tensor([4]))
    assert torch.equal(layer.dense_kv()[1], v[[0]])


def test_memory_report_counts_every_byte(tiny_llama):
    cache = KVCompCache(tiny_llama.config)
    ids = torch.randint(3, 256, (2, 500))
    with torch.no_grad():
        tiny_llama(ids, **cache_kwargs(cache), use_cache=True)
    report = cache.memory_report()
    n_layers, b, h, d = 2, 2, 2, 16
    assert report["tokens"] == 500
    assert report["config"]["layout"] == "auto" and report["storage_layout"] == "fixed_v"
    assert all(layer.store.fmt.layout == "fixed_v" for layer in cache.layers)
    assert report["dense_bytes"] == 2 * n_layers * b * h * 500 * d * 4
    held = 0
    for layer in cache.layers:
        s = layer.store
        held += s.used_bytes()                                      # every segment byte, padding included
        perm = 64 if s.has_perm else 0                              # repack "none" stores no permutation
        held += s.n_slots * (s.seg_offset[0].numel() * (8 + 4) + 2 * 64 * s.fmt.groups * (4 + 2) + perm)
        held += 2 * layer.keys.numel() * 4 + layer.block_table.numel() * 4
    assert report["compressed_bytes"] == pytest.approx(held)
    assert report["bits_per_value"] == pytest.approx(8 * held / (report["dense_bytes"] / 4))
    assert report["compression_ratio"] == pytest.approx(report["dense_bytes"] / held)
    assert report["k"]["compressed_bytes"] + report["v"]["compressed_bytes"] == pytest.approx(held)
    assert report["k"]["dense_bytes"] == report["v"]["dense_bytes"] == report["dense_bytes"] / 2
    for kv in ("k", "v"):  # each half reports its own ratio and bits/value (fp32 model: 4 bytes a value)
        part = report[kv]
        assert part["compression_ratio"] == pytest.approx(part["dense_bytes"] / part["compressed_bytes"])
        assert part["bits_per_value"] == pytest.approx(8 * part["compressed_bytes"] / (part["dense_bytes"] / 4))


def test_reset_empties_the_cache(tiny_llama):
    cache = KVCompCache(tiny_llama.config)
    with torch.no_grad():
        tiny_llama(torch.randint(3, 256, (1, 300)), **cache_kwargs(cache), use_cache=True)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_report()["compressed_bytes"] == 0


def test_entry_points_agree(tiny_llama):
    ids = torch.randint(3, 256, (1, 250))
    cfg = {"rel_k": 0.1, "rel_v": 0.2}
    a = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, cache_implementation="kvcomp", cache_config=cfg)
    b = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False,
                            **cache_kwargs(KVCompCache(tiny_llama.config, KVCompConfig(**cfg))))
    c = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=kvcomp_hf.custom_generate,
                            kvcomp_config=cfg)
    d = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, cache_implementation="kvcomp",
                            cache_config={"preset": "default"})
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_wrong_attention_implementation(tiny_llama):
    tiny_llama.set_attn_implementation("sdpa")
    ids = torch.randint(3, 256, (1, 20))
    with pytest.raises(ValueError, match="attn_implementation='kvcomp'"):
        tiny_llama.generate(ids, max_new_tokens=2, **cache_kwargs(KVCompCache(tiny_llama.config)))
    # cache_implementation switches for the call and restores afterwards
    out = tiny_llama.generate(ids, max_new_tokens=2, cache_implementation="kvcomp")
    assert out.shape[1] == 22
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_bad_cache_arguments(tiny_llama):
    with pytest.raises(ValueError, match="model config"):
        KVCompCache(KVCompConfig())
    with pytest.raises(ValueError, match="pack_size"):
        KVCompCache(tiny_llama.config, {"pack_size": 3})
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="mutually exclusive"):
        tiny_llama.generate(ids, cache_implementation="kvcomp", **cache_kwargs(DynamicCache(config=tiny_llama.config)),
                            max_new_tokens=1)
    with pytest.raises(ValueError, match="use_cache=False"):
        tiny_llama.generate(ids, use_cache=False, **cache_kwargs(KVCompCache(tiny_llama.config)), max_new_tokens=1)
    if CACHE_KWARG == "cache":  # transformers 5.24+: given both names, transformers would drop past_key_values
        with pytest.raises(ValueError, match="two caches"):
            tiny_llama.generate(ids, cache=DynamicCache(config=tiny_llama.config),
                                past_key_values=KVCompCache(tiny_llama.config), max_new_tokens=1)


def test_unsupported_models_fail_clearly():
    from transformers import DeepseekV3Config, Gemma2Config, MistralConfig

    with pytest.raises(ValueError, match="sliding-window"):
        KVCompCache(MistralConfig(sliding_window=4096, num_hidden_layers=2))
    KVCompCache(MistralConfig(sliding_window=None, num_hidden_layers=2))  # Mistral v0.3: full attention
    with pytest.raises(ValueError, match="full-attention"):
        KVCompCache(Gemma2Config(num_hidden_layers=2))
    with pytest.raises(ValueError, match="MLA"):
        KVCompCache(DeepseekV3Config(num_hidden_layers=2))


def test_assistant_inherits_kvcomp_cache_implementation(tiny_llama):
    assistant = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval()
    ids = torch.randint(3, 256, (1, 150))
    ref = tiny_llama.generate(ids, max_new_tokens=30, do_sample=False)
    out = tiny_llama.generate(ids, max_new_tokens=30, do_sample=False, assistant_model=assistant,
                              cache_implementation="kvcomp", cache_config={"rel_k": 1e-4, "rel_v": 1e-4})
    assert torch.equal(out, ref)
    assert assistant.config._attn_implementation != "kvcomp"  # switched for the call only


def test_fit_pool_keeps_every_block_and_gives_back_the_reservation():
    torch.manual_seed(8)
    layer = KVCompLayer(KVCompConfig())
    k, v = torch.randn(2, 2, 700, 16), torch.randn(2, 2, 700, 16)
    layer.update(k, v)
    store = layer.store
    before = layer.dense_kv()
    used = store.used_bytes()
    store.pool = store._grown(store.pool, 10 * used)  # as after a worst-case reservation
    store.fit_pool()
    assert used <= store.pool.numel() <= 1.125 * used + 4096
    after = layer.dense_kv()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    layer.update(k[:, :, :100], v[:, :, :100])  # appending after the fit still works
    assert torch.equal(layer.dense_kv()[0][:, :, :512], before[0][:, :, :512])  # the 8 blocks compressed before


@pytest.mark.cuda
def test_prefill_store_does_not_wait_for_the_gpu_and_fits_its_pool_at_the_next_layer():
    """A prefill-sized store on CUDA makes no host sync (an .item() per layer let the GPU idle while the host
    prepared the next layer); its worst-case reservation is fitted when the next layer updates, and the
    fitted pool decodes to the same K/V."""
    from kvcomp_hf.block_store import FIT_POOL_AFTER_BYTES, fit_pending_pools

    torch.manual_seed(3)
    cfg = KVCompConfig()
    # tokens repeat within each block, so the packs are narrow and the fit really shrinks the worst-case pool
    block_of = (torch.arange(8192, device="cuda") - cfg.sink_tokens).clamp(min=0) // 64
    k, v = (torch.randn(2, 8, 129, 128, device="cuda", dtype=torch.bfloat16)[:, :, block_of] for _ in range(2))
    KVCompLayer(cfg, backend="triton").update(k, v)  # compiles the kernels
    layers = [KVCompLayer(cfg, backend="triton", layer_idx=i) for i in range(2)]
    for layer in layers:
        layer.lazy_initialization(k, v)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layers[0].update(k, v)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    store = layers[0].store
    assert store.max_bytes(layers[0].block_table.numel()) >= FIT_POOL_AFTER_BYTES  # a prefill-sized store
    reserved = store.pool.numel()
    want = layers[0].dense_kv()
    layers[1].update(k, v)  # fits layer 0's pool
    fit_pending_pools()
    used = int(store.pool_used.item())
    assert store.used_bound == used and store.pool.numel() < reserved
    assert used <= store.pool.numel() <= 1.125 * used + 4096
    got = layers[0].dense_kv()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    kept = cfg.sink_tokens + layers[0].block_table.shape[1] * 64  # (the append below compresses one more block)
    layers[0].update(k[:, :, :64], v[:, :, :64])  # appends after the fit
    assert torch.equal(layers[0].dense_kv()[0][:, :, :kept], want[0][:, :, :kept])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_integer_tail_holds_what_the_frontier_lever_simulated(dtype):
    """tail_bits=8 stores the tail as codec stage-5 rows, the sinks exact: the same K/V stream gives bit for bit the
    values of eval.frontier's |tail=8 lever (fake quantisation of every arriving token past the sinks), whose
    accuracy RESULTS reports; through beam reorder, repeat and a crop inside the tail. The tail's bytes are the
    rows plus the exact sinks."""
    from eval.frontier import _integer_tail

    torch.manual_seed(21)
    cfg = KVCompConfig(rel_k=0.05, rel_v=0.1, sink_tokens=4, residual_length=64)
    ours, lever = KVCompLayer(dataclasses.replace(cfg, tail_bits=8)), KVCompLayer(cfg)
    _integer_tail(lever, 8)
    b, h, d = 2, 2, 16
    for step, q_len in enumerate([2, 1, 150, 1, 64, 1, 1, 70]):
        k = (torch.randn(b, h, q_len, d) * torch.linspace(0.5, 4, d)).to(dtype)
        v = torch.randn(b, h, q_len, d).to(dtype)
        ours.update(k, v)
        lever.update(k, v)
        if step == 4:
            for layer in (ours, lever):
                layer.batch_select_indices(torch.tensor([1, 0]))
                layer.batch_repeat_interleave(2)
                layer.batch_select_indices(torch.tensor([0, 3]))
        for a, c in zip(ours.dense_kv(), lever.dense_kv()):
            assert torch.equal(a, c)
    assert ours.keys.dtype == torch.uint8 and ours.block_table.shape[1] >= 3
    t = ours.keys.shape[2]
    ours.crop(-(t - 10))  # inside the tail: the first tokens as they were
    lever.crop(-(t - 10))
    assert torch.equal(ours.dense_kv()[0], lever.dense_kv()[0])
    t, es = ours.keys.shape[2], dtype.itemsize
    assert ours.memory_report()["parts"]["k"]["tail"] == b * h * (t * (d + 2 * es) + 4 * d * es)  # rows + sinks
    # the lever's count plus the sinks' rows, and m and M at the model dtype's width (the lever counts 16 bits each)
    want = lever.memory_report()["parts"]["k"]["tail"] + b * h * (4 * (d + 2 * es) + (t - 4) * (2 * es - 4))
    assert ours.memory_report()["parts"]["k"]["tail"] == want


@pytest.mark.parametrize("device, d", [("cpu", 16), ("cpu", 128), pytest.param("cuda", 128, marks=pytest.mark.cuda)])
def test_integer_tail_crop_into_a_block_and_fused_decode(device, d):
    """A crop inside a block re-encodes its decoded tokens as tail rows (one more 8-bit rounding: close, not
    equal); the fused Triton decode (interpreted on CPU) reads the decoded tail as the dense path does."""
    torch.manual_seed(22)
    layer = KVCompLayer(KVCompConfig(sink_tokens=4, residual_length=0, tail_bits=8))
    k, v = (torch.randn(1, 2, 300, d, dtype=torch.bfloat16, device=device) for _ in range(2))
    layer.update(k, v)
    before = layer.dense_kv(torch.float32, rotated=True)[0][:, :, :200]  # stored coordinates: rows round there
    layer.crop(-100)  # 200 tokens: into the fourth block
    after = layer.dense_kv(torch.float32, rotated=True)[0]
    assert after.shape[2] == 200 and torch.equal(after[:, :, :4], before[:, :, :4])  # the sinks exact
    # half an 8-bit step of the row, and two roundings to bf16 (the decoded block, then the decoded row)
    row_range = before.amax(-1, keepdim=True) - before.amin(-1, keepdim=True)
    assert ((after - before).abs() <= row_range / 510 + before.abs() / 128).all()
    q = torch.randn(1, 4, 1, d, dtype=torch.bfloat16, device=device)
    layer.use_triton = True
    fused = layer.attend(q, None, d**-0.5, FakeAttention(2))[0]
    dense = layer.attend_dense(q, None, d**-0.5, FakeAttention(2))[0]
    assert rel_err(fused.float(), dense.float()) < 1e-2


def test_integer_tail_on_the_triton_kernels_equals_the_torch_path(monkeypatch):
    """With the Triton kernels (on a GPU; interpreted here) the tail rows are coded and decoded by
    kernels/tail_rows.py, one launch each: the same rows, sinks, blocks and decoded tail as the PyTorch path, bit for
    bit, through block compression, batch selection and a crop into a block."""
    from kvcomp_hf import cache as cache_module

    monkeypatch.setattr(cache_module, "_use_triton", lambda backend, k, fmt: backend != "torch")
    torch.manual_seed(23)
    # no rotation: the rotation kernel and PyTorch's float32 product may round a value differently
    cfg = KVCompConfig(rel_k=0.05, rel_v=0.1, sink_tokens=4, residual_length=64, tail_bits=8, rotation="none")
    reference, kernels = KVCompLayer(cfg, backend="torch"), KVCompLayer(cfg)
    b, h, d = 2, 2, 16

    def same():
        assert torch.equal(reference.keys, kernels.keys) and torch.equal(reference.values, kernels.values)
        assert torch.equal(reference.sink_keys, kernels.sink_keys)
        for x, y in zip(reference.tail() + reference.dense_kv(), kernels.tail() + kernels.dense_kv()):
            assert torch.equal(x, y)

    for step, q_len in enumerate([2, 1, 150, 1, 70, 1]):
        k = (torch.randn(b, h, q_len, d) * torch.linspace(0.5, 4, d)).to(torch.bfloat16)
        v = torch.randn(b, h, q_len, d).to(torch.bfloat16)
        for layer in (reference, kernels):
            layer.update(k, v)
            if step == 3:
                layer.batch_select_indices(torch.tensor([1, 0]))
        same()
    assert kernels.use_triton and not reference.use_triton and kernels.block_table.shape[1] == 2
    for layer in (reference, kernels):
        layer.crop(-100)  # into a block: decoded and re-encoded as rows
    same()


def test_static_cache_refuses_an_integer_tail(tiny_llama):
    with pytest.raises(ValueError, match="tail_bits=None"):
        kvcomp_hf.KVCompCache(tiny_llama.config, {"layout": "fixed", "tail_bits": 8}, max_cache_len=64).layers[0]


def test_the_integer_tail_adds_host_ops_that_eval_counts():
    """eval.count_tail_ops counts the torch ops of a layer's one-token update and tail(): none for reading a tail
    held in the model dtype, some for the 8-bit rows (what eager decoding pays per layer and step)."""
    from eval import count_tail_ops

    plain = count_tail_ops.count("kvcomp:residual_length=128", 300)
    rows = count_tail_ops.count("kvcomp:residual_length=128,tail_bits=8", 300)
    assert plain["tail"] == 0 and rows["tail"] > 0 and rows["update"] > plain["update"]
    # on the GPU's path (kernels/tail_rows.py) a launch each for coding and decoding, fewer ops around them
    launched = count_tail_ops.count("kvcomp:residual_length=128,tail_bits=8", 300, kernels=True)
    assert plain["update"] < launched["update"] < rows["update"] and 0 < launched["tail"] < rows["tail"]
    assert count_tail_ops.count("kvcomp:residual_length=128", 300, kernels=True) == plain
