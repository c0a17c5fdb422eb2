"""Registration with transformers: attention + mask under "kvcomp", and cache_implementation="kvcomp".

transformers 5.x has no registry for cache implementations, so `register()` patches exactly two
points (the list `GenerationConfig.validate` checks, and `GenerationMixin._prepare_cache_for_generation`)
plus a thin wrapper around `generate` that restores the attention implementation it had to switch and
checks that generate() used the KVCompCache it was given. All of it is idempotent. `custom_generate`
offers the same without any patch.

The cache travels through generate() under one keyword, which transformers renamed: `cache` from 5.24,
`past_key_values` before (compat.CACHE_KWARG is the installed version's name).
"""

from __future__ import annotations

import copy
import functools

import transformers.generation.configuration_utils as generation_config_module
from transformers import AttentionInterface, GenerationMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging

from .attention import kvcomp_attention_forward
from .cache import ATTN_IMPLEMENTATION, KVCompCache
from .compat import CACHE_KWARG, OLD_CACHE_KWARG
from .config import resolve_config

CACHE_IMPLEMENTATION = "kvcomp"
logger = logging.get_logger(__name__)


def use_kvcomp_attention(model) -> str | None:
    """Switch the model to "kvcomp" attention if it is not; return the previous name if switched."""
    previous = model.config._attn_implementation
    if previous == ATTN_IMPLEMENTATION:
        return None
    logger.warning_once(f"kvcomp: switching attn_implementation from {previous!r} to {ATTN_IMPLEMENTATION!r} for this "
                        f"generate() call; load the model with attn_implementation={ATTN_IMPLEMENTATION!r} to avoid this")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return previous


STATIC_KEY = "static"  # cache_config={"static": True, ...}: a KVCompStaticLayer cache sized for the call


def _new_cache(model, cache_config, max_cache_len: int | None = None, batch_size: int | None = None) -> KVCompCache:
    """A KVCompCache for one generate() call. With "static": True in cache_config, a static cache of max_cache_len
    tokens (generate's own sizing), which transformers then compiles: the model keeps it and the next call with the
    same config, batch and a length that fits resets and reuses it (as transformers does with StaticCache), so the
    compiled step and its CUDA graphs are reused rather than recaptured."""
    config = {} if cache_config is None else copy.deepcopy(cache_config)  # 0 or [] is an error, not the defaults
    static = isinstance(config, dict) and config.pop(STATIC_KEY, False)
    if static is not True and static is not False:
        raise ValueError(f"cache_config['static'] must be True or False, got {static!r}")
    text_config = model.config.get_text_config(decoder=True)
    if not static:
        return KVCompCache(text_config, config)
    if not max_cache_len:
        raise ValueError("cache_config={'static': True} needs generate() to know the maximum length (max_new_tokens)")
    old = model.__dict__.get("_kvcomp_static_cache")
    if old is not None and old.kvcomp_config == resolve_config(config):
        layer = old.layers[0]
        fits = layer.max_cache_len >= max_cache_len
        same_batch = not layer.is_initialized or layer.ring_k.shape[0] == batch_size
        if fits and same_batch:
            old.reset()
            return old
    cache = KVCompCache(text_config, config, max_cache_len=max_cache_len)
    model.__dict__["_kvcomp_static_cache"] = cache
    return cache


def _patched_prepare_cache(original):
    @functools.wraps(original)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if generation_config.cache_implementation != CACHE_IMPLEMENTATION:
            return original(self, generation_config, model_kwargs, *args, **kwargs)
        user_cache = model_kwargs.get(CACHE_KWARG)
        if user_cache is not None and not isinstance(user_cache, KVCompCache):
            raise ValueError(f"cache_implementation='kvcomp' and {CACHE_KWARG}={type(user_cache).__name__}(...) are "
                             "mutually exclusive: pass one or the other")
        if generation_config.use_cache is False:
            return None
        previous = use_kvcomp_attention(self)
        if previous is not None:
            self._kvcomp_restore_attention = previous
        if user_cache is not None:  # continuing a kvcomp cache (an assistant model's, between its calls)
            user_cache._is_user_defined = True
        else:
            # generate()'s positional arguments after model_kwargs: generation_mode, batch_size, max_cache_length
            max_len = kwargs.get("max_cache_length", args[2] if len(args) > 2 else None)
            if max_len is not None and getattr(generation_config, "max_cache_len", None):
                max_len = max(max_len, generation_config.max_cache_len)
            batch = kwargs.get("batch_size", args[1] if len(args) > 1 else None)
            if batch is not None:
                batch *= max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
            model_kwargs[CACHE_KWARG] = _new_cache(self, generation_config.cache_config, max_len, batch)
            if getattr(generation_config, "is_assistant", False):  # as transformers does for the caches it builds
                model_kwargs[CACHE_KWARG].activate_past_recording()
        return None

    _prepare_cache_for_generation._kvcomp_patched = True
    return _prepare_cache_for_generation


def _passed_kvcomp_cache(kwargs: dict) -> KVCompCache | None:
    """The KVCompCache a generate() call was given, under either keyword; an error where transformers would
    drop it (given both keywords, transformers 5.24 keeps `cache` and ignores `past_key_values`)."""
    given = {name: kwargs[name] for name in {CACHE_KWARG, OLD_CACHE_KWARG} if kwargs.get(name) is not None}
    caches = [c for c in given.values() if isinstance(c, KVCompCache)]
    if len(given) > 1 and caches and given[CACHE_KWARG] is not given[OLD_CACHE_KWARG]:
        raise ValueError(f"generate() got two caches, cache={type(given[CACHE_KWARG]).__name__}(...) and "
                         f"past_key_values={type(given[OLD_CACHE_KWARG]).__name__}(...): transformers would use only "
                         f"one of them; pass the KVCompCache once, as {CACHE_KWARG}=")
    if caches and kwargs.get("use_cache") is False:
        raise ValueError("generate() got a KVCompCache and use_cache=False, so the cache would not be used: "
                         "drop use_cache=False or the cache")
    return caches[0] if caches else None


def _patched_generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        user_cache = _passed_kvcomp_cache(kwargs)
        length_before = int(user_cache.get_seq_length()) if user_cache is not None else 0  # a static cache's is a view
        try:
            out = original(self, *args, **kwargs)
        finally:
            previous = self.__dict__.pop("_kvcomp_restore_attention", None)
            if previous is not None:
                self.set_attn_implementation(previous)
        if user_cache is not None and int(user_cache.get_seq_length()) == length_before:
            raise RuntimeError("generate() did not use the KVCompCache it was given (it still holds "
                               f"{length_before} tokens): this transformers version may have replaced it with a "
                               f"cache of its own; pass the cache as {CACHE_KWARG}=")
        return out

    generate._kvcomp_patched = True
    return generate


def register() -> None:
    """Make attn_implementation="kvcomp" and generate(cache_implementation="kvcomp") work. Idempotent."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvcomp_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    names = generation_config_module.ALL_CACHE_IMPLEMENTATIONS
    if CACHE_IMPLEMENTATION not in names:
        generation_config_module.ALL_CACHE_IMPLEMENTATIONS = tuple(names) + (CACHE_IMPLEMENTATION,)
    if not getattr(GenerationMixin._prepare_cache_for_generation, "_kvcomp_patched", False):
        GenerationMixin._prepare_cache_for_generation = _patched_prepare_cache(
            GenerationMixin._prepare_cache_for_generation)
    if not getattr(GenerationMixin.generate, "_kvcomp_patched", False):
        GenerationMixin.generate = _patched_generate(GenerationMixin.generate)


def custom_generate(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                    kvcomp_config=None, **model_kwargs):
    """generate() with a fresh KVCompCache and no patching:
    model.generate(ids, custom_generate=kvcomp_hf.custom_generate, kvcomp_config={"rel_k": 0.1})"""
    given = model_kwargs.get(CACHE_KWARG)
    if getattr(given, "_is_user_defined", False):  # transformers' own cache for the call is replaced below
        raise ValueError(f"custom_generate=kvcomp_hf.custom_generate builds its own KVCompCache: drop "
                         f"{CACHE_KWARG}={type(given).__name__}(...) or call generate() without custom_generate")
    previous = use_kvcomp_attention(model)
    try:
        model_kwargs[CACHE_KWARG] = _new_cache(model, kvcomp_config)
        method = GenerationMixin._beam_search if generation_config.num_beams > 1 else GenerationMixin._sample
        return method(model, input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                      generation_config=generation_config, **model_kwargs)
    finally:
        if previous is not None:
            model.set_attn_implementation(previous)
