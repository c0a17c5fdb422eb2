"""Blocks no row references (after beam reorder, batch selection, crop) are freed, and memory_report() tells what
the cache holds apart from what its rows use."""

import pytest
import torch

import kvcomp_hf
import kvcomp_hf.cache as cache_module
from kvcomp_hf import KVCompCache, KVCompConfig
from kvcomp_hf.cache import KVCompLayer


def referenced_segment_bytes(layer):
    slots = torch.unique(layer.block_table).long()
    return int(layer.store.seg_bytes[slots].sum())


def filled_layer(batch, tokens, seed, config=KVCompConfig()):
    torch.manual_seed(seed)
    layer = KVCompLayer(config)
    k, v = torch.randn(batch, 2, tokens, 16), torch.randn(batch, 2, tokens, 16)
    layer.update(k, v)
    return layer


# the default layout shares one identity permutation row; PackKV's stores one per block
LAYOUTS = [KVCompConfig(), KVCompConfig(pack_size=16, repack="median")]


@pytest.mark.parametrize("config", LAYOUTS, ids=["pack64", "pack16-median"])
def test_beam_reorder_frees_blocks_no_row_references(config):
    layer = filled_layer(3, 400, seed=0, config=config)     # 3 rows x 4 blocks, none shared
    k, v = layer.dense_kv()
    assert layer.store.n_slots == 12
    layer.reorder_cache(torch.tensor([1, 1, 1]))             # beams 0 and 2 die: their 8 blocks are orphans
    assert layer.store.n_slots == 4 and layer.store.used_bytes() == referenced_segment_bytes(layer)
    k2, v2 = layer.dense_kv()
    assert torch.equal(k2, k[[1, 1, 1]]) and torch.equal(v2, v[[1, 1, 1]])
    # the rows diverge (3 new blocks), then one beam takes over again; the kept blocks still decode exactly
    new_k, new_v = torch.randn(3, 2, 64, 16), torch.randn(3, 2, 64, 16)
    layer.update(new_k, new_v)
    k3, v3 = layer.dense_kv()
    for step in range(3):                                    # a reorder per decode step, as beam search does
        layer.reorder_cache(torch.tensor([2, 2, 0]) if step == 0 else torch.arange(3))
    assert layer.store.n_slots == 6                          # 4 shared + the 2 new blocks the rows reference
    assert torch.equal(layer.dense_kv()[0], k3[[2, 2, 0]]) and torch.equal(layer.dense_kv()[1], v3[[2, 2, 0]])
    layer.update(new_k[:, :, :1], new_v[:, :, :1])           # appending after a compaction still works
    assert layer.get_seq_length() == 465


def test_compaction_is_amortised_not_per_step(monkeypatch):
    calls = []
    real = cache_module.BlockStore.compact
    monkeypatch.setattr(cache_module.BlockStore, "compact", lambda self, table: calls.append(1) or real(self, table))
    layer = filled_layer(3, 200, seed=1)
    for _ in range(50):                                      # every row keeps its blocks: nothing to free
        layer.reorder_cache(torch.arange(3))
    assert len(calls) == 1                                   # one look after the first reorder, then none


def test_batch_select_frees_the_dropped_rows_blocks_and_report_counts_them(monkeypatch):
    layer = filled_layer(2, 700, seed=2)
    k, _ = layer.dense_kv()
    cache = KVCompCache.__new__(KVCompCache)
    cache.layers, cache.kvcomp_config = [layer], layer.config
    before = cache.memory_report()
    assert before["unreferenced_blocks"] == 0

    with monkeypatch.context() as patch:                     # without compaction: what the report says
        patch.setattr(KVCompLayer, "_maybe_compact", lambda self: None)
        layer.batch_select_indices(torch.tensor([0]))
        stale = cache.memory_report()
    assert stale["unreferenced_blocks"] == 8
    assert stale["held_parts"]["pool_in_use"] == layer.store.used_bytes() > referenced_segment_bytes(layer)
    assert stale["held_bytes"] >= stale["held_parts"]["pool"] + stale["held_parts"]["tail"]
    assert stale["held_bytes"] > stale["compressed_bytes"]
    assert stale["compressed_bytes"] < 0.6 * before["compressed_bytes"]   # the live row uses about half

    layer.batch_select_indices(torch.tensor([0]))
    after = cache.memory_report()
    assert after["unreferenced_blocks"] == 0 and layer.store.n_slots == 8
    assert after["held_parts"]["pool_in_use"] == referenced_segment_bytes(layer)
    assert after["compressed_bytes"] == stale["compressed_bytes"]
    assert torch.equal(layer.dense_kv()[0], k[[0]])


@pytest.mark.parametrize("config", LAYOUTS, ids=["pack64", "pack16-median"])
def test_crop_frees_dropped_blocks(config):
    layer = filled_layer(1, 1000, seed=3, config=config)    # 13 blocks + tail
    k, _ = layer.dense_kv()
    layer.crop(-700)
    assert layer.store.n_slots == 4 and layer.store.used_bytes() == referenced_segment_bytes(layer)
    assert torch.equal(layer.dense_kv()[0], k[:, :, :300])


def test_beam_search_holds_few_unreferenced_blocks(tiny_llama):
    torch.manual_seed(4)
    ids = torch.randint(3, 256, (1, 300))
    cache = KVCompCache(tiny_llama.config, {"rel_k": 1e-4, "rel_v": 1e-4})
    out = tiny_llama.generate(ids, num_beams=3, max_new_tokens=40, do_sample=False, **kvcomp_hf.cache_kwargs(cache))
    assert torch.equal(out, tiny_llama.generate(ids, num_beams=3, max_new_tokens=40, do_sample=False))
    report = cache.memory_report()
    referenced = sum(torch.unique(layer.block_table).numel() for layer in cache.layers)
    # before: the 3 beams' prefill copies stayed (2 of 3 unreferenced) for the whole generation
    assert report["unreferenced_blocks"] <= cache_module.COMPACT_SLACK * referenced + 2 * len(cache.layers)
    assert report["held_parts"]["pool_in_use"] <= 1.5 * sum(referenced_segment_bytes(layer) for layer in cache.layers)


@pytest.mark.cuda
def test_compaction_keeps_triton_blocks_readable_on_cuda():
    torch.manual_seed(5)
    layer = KVCompLayer(KVCompConfig())
    k = torch.randn(3, 2, 400, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(3, 2, 400, 64, device="cuda", dtype=torch.float16)
    layer.update(k, v)
    assert layer.use_triton
    dense_k, dense_v = layer.dense_kv(torch.float32)
    layer.reorder_cache(torch.tensor([1, 1, 0]))
    assert layer.store.n_slots == 8
    assert torch.equal(layer.dense_kv(torch.float32)[0], dense_k[[1, 1, 0]])
    compressed = layer.block_table.shape[1] * 64           # tokens held in blocks before the next store
    layer.update(k[:, :, :70], v[:, :, :70])                # the Triton store appends after a compaction
    assert layer.block_table.shape[1] * 64 > compressed
    assert torch.equal(layer.dense_kv(torch.float32)[1][:, :, :compressed], dense_v[[1, 1, 0]][:, :, :compressed])

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal, training = 2, True, False

    q = torch.randn(3, 4, 1, 64, device="cuda", dtype=torch.float16)
    fused = layer.attend_fused(q, None, 0.125)
    exact, _ = layer.attend_dense(q, None, 0.125, Module(), exact=True)
    assert (fused.float() - exact.float()).abs().max() < 1e-2
