"""Registration with transformers: attention + mask under "kvcomp", and cache_implementation="kvcomp".

transformers 5.x has no registry for cache implementations, so `register()` patches exactly two
points (the list `GenerationConfig.validate` checks, and `GenerationMixin._prepare_cache_for_generation`)
plus a thin wrapper around `generate` that restores the attention implementation it had to switch.
All of it is idempotent. `custom_generate` offers the same without any patch.
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


def _new_cache(model, cache_config) -> KVCompCache:
    config = {} if cache_config is None else copy.deepcopy(cache_config)  # 0 or [] is an error, not the defaults
    return KVCompCache(model.config.get_text_config(decoder=True), config)


def _patched_prepare_cache(original):
    @functools.wraps(original)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if generation_config.cache_implementation != CACHE_IMPLEMENTATION:
            return original(self, generation_config, model_kwargs, *args, **kwargs)
        user_cache = model_kwargs.get("past_key_values")
        if user_cache is not None and not isinstance(user_cache, KVCompCache):
            raise ValueError("cache_implementation='kvcomp' and past_key_values are mutually exclusive: "
                             "pass one or the other")
        if generation_config.use_cache is False:
            return None
        previous = use_kvcomp_attention(self)
        if previous is not None:
            self._kvcomp_restore_attention = previous
        if user_cache is not None:  # continuing a kvcomp cache (an assistant model's, between its calls)
            user_cache._is_user_defined = True
        else:
            model_kwargs["past_key_values"] = _new_cache(self, generation_config.cache_config)
        return None

    _prepare_cache_for_generation._kvcomp_patched = True
    return _prepare_cache_for_generation


def _patched_generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        finally:
            previous = self.__dict__.pop("_kvcomp_restore_attention", None)
            if previous is not None:
                self.set_attn_implementation(previous)

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
    previous = use_kvcomp_attention(model)
    try:
        model_kwargs["past_key_values"] = _new_cache(model, kvcomp_config)
        method = GenerationMixin._beam_search if generation_config.num_beams > 1 else GenerationMixin._sample
        return method(model, input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                      generation_config=generation_config, **model_kwargs)
    finally:
        if previous is not None:
            model.set_attn_implementation(previous)
