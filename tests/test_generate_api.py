"""Every way of handing kvcomp to generate(), on the installed transformers (CI runs 5.17 and the newest):
generate() must run every forward on the KVCompCache (the user's own object where one was passed), return
it, give the tokens a DynamicCache gives at a near-lossless setting, and our code must warn about nothing."""

import warnings

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

import kvcomp_hf
from kvcomp_hf import CACHE_KWARG, KVCompCache, cache_kwargs, returned_cache

from helpers import tiny_llama_config

NEAR_LOSSLESS = {"rel_k": 1e-4, "rel_v": 1e-4}
NEW_TOKENS = 40


class CacheSpy:
    """Records the cache object of every forward() of a model."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.register_forward_pre_hook(
            lambda module, args, kwargs: self.seen.append(kwargs.get(CACHE_KWARG)), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def assistant_model():
    torch.manual_seed(11)
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval()


# name -> (generate kwargs, whether the user passes the cache object)
WAYS = {
    "cache keyword": (lambda m: cache_kwargs(KVCompCache(m.config, NEAR_LOSSLESS)), True),
    "cache_implementation": (lambda m: {"cache_implementation": "kvcomp", "cache_config": NEAR_LOSSLESS}, False),
    "custom_generate": (lambda m: {"custom_generate": kvcomp_hf.custom_generate, "kvcomp_config": NEAR_LOSSLESS},
                        False),
    "assistant model": (lambda m: {**cache_kwargs(KVCompCache(m.config, NEAR_LOSSLESS)),
                                   "assistant_model": assistant_model()}, True),
    "assistant + cache_implementation": (lambda m: {"cache_implementation": "kvcomp", "cache_config": NEAR_LOSSLESS,
                                                    "assistant_model": assistant_model()}, False),
    "prompt lookup": (lambda m: {**cache_kwargs(KVCompCache(m.config, NEAR_LOSSLESS)),
                                 "prompt_lookup_num_tokens": 3}, True),
    "chunked prefill": (lambda m: {**cache_kwargs(KVCompCache(m.config, NEAR_LOSSLESS)), "prefill_chunk_size": 64},
                        True),
    "chunked prefill + cache_implementation": (lambda m: {"cache_implementation": "kvcomp", "cache_config": NEAR_LOSSLESS,
                                                          "prefill_chunk_size": 64}, False),
}


def prompt():
    torch.manual_seed(12)
    ids = torch.randint(3, 256, (1, 330))
    ids[0, 100:120] = ids[0, 20:40]  # a repeat, so prompt lookup finds candidates
    return ids


@pytest.mark.parametrize("way", list(WAYS))
def test_generate_runs_on_the_kvcomp_cache_it_was_given(tiny_llama, way):
    ids = prompt()
    want = tiny_llama.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    make_kwargs, user_passes_cache = WAYS[way]
    kwargs = make_kwargs(tiny_llama)
    with CacheSpy(tiny_llama) as spy, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tiny_llama.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                                  **kwargs)
    cache = returned_cache(out)
    assert isinstance(cache, KVCompCache)
    if user_passes_cache:
        assert cache is kwargs[CACHE_KWARG]
    assert spy.seen and all(seen is cache for seen in spy.seen)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert cache.layers[0].block_table.shape[1] >= 3  # blocks were compressed: it is not a dense fallback
    assert torch.equal(out.sequences, want)
    assert not [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]


def test_the_old_keyword_still_reaches_the_cache(tiny_llama):
    """past_key_values= (the name up to transformers 5.23; deprecated from 5.24) keeps working: transformers
    itself warns about the user's keyword on 5.24, and the cache it used is still the one passed."""
    ids = prompt()
    cache = KVCompCache(tiny_llama.config, NEAR_LOSSLESS)
    with CacheSpy(tiny_llama) as spy, warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = tiny_llama.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache)
    assert spy.seen and all(seen is cache for seen in spy.seen)
    assert cache.get_seq_length() == out.shape[1] - 1


def test_multi_turn_continues_the_returned_cache(tiny_llama):
    ids = prompt()
    first = tiny_llama.generate(ids, max_new_tokens=30, do_sample=False, return_dict_in_generate=True,
                                cache_implementation="kvcomp", cache_config=NEAR_LOSSLESS)
    cache = returned_cache(first)
    turn2 = torch.cat([first.sequences, torch.randint(3, 256, (1, 90))], dim=1)
    with CacheSpy(tiny_llama) as spy:
        second = tiny_llama.generate(turn2, max_new_tokens=30, do_sample=False, **cache_kwargs(cache))
    assert all(seen is cache for seen in spy.seen)
    assert cache.get_seq_length() == second.shape[1] - 1

    ref = tiny_llama.generate(ids, max_new_tokens=30, do_sample=False, return_dict_in_generate=True,
                              **cache_kwargs(DynamicCache(config=tiny_llama.config)))
    ref2 = tiny_llama.generate(turn2, max_new_tokens=30, do_sample=False, **cache_kwargs(returned_cache(ref)))
    assert torch.equal(second, ref2)


def test_a_cache_generate_did_not_use_is_an_error(tiny_llama, monkeypatch):
    """If a transformers release ever routes the cache elsewhere, generate() raises instead of quietly decoding on
    a cache of its own (simulated by a forward that drops the cache)."""
    forward = type(tiny_llama).forward

    def forward_dropping_the_cache(self, *args, **kwargs):
        kwargs[CACHE_KWARG] = DynamicCache(config=self.config)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_llama), "forward", forward_dropping_the_cache)
    with pytest.raises(RuntimeError, match="did not use the KVCompCache"):
        tiny_llama.generate(prompt(), max_new_tokens=3, do_sample=False,
                            **cache_kwargs(KVCompCache(tiny_llama.config)))
