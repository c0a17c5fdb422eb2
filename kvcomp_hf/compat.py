"""What differs between the transformers releases kvcomp supports (5.17 to 5.24).

transformers 5.24 renamed the cache's keyword from `past_key_values` to `cache`, in generate(), in the
models' forward() and in their outputs; the old name still works there but warns. Code that hands a cache
to transformers spells it through these helpers, so it uses the installed version's name and warns on none:

    model.generate(ids, **kvcomp_hf.cache_kwargs(cache))
    model(ids, use_cache=True, **kvcomp_hf.cache_kwargs(cache))
    kvcomp_hf.returned_cache(out)          # out.cache on 5.24, out.past_key_values before
"""

from __future__ import annotations

import transformers.generation.utils as generation_utils

# The keyword generate() and forward() take the cache under: "cache" from transformers 5.24
CACHE_KWARG = "cache" if "cache" in generation_utils.ALL_CACHE_NAMES else "past_key_values"
OLD_CACHE_KWARG = "past_key_values"


def cache_kwargs(cache) -> dict:
    """{CACHE_KWARG: cache}, to pass a cache to generate() or forward() under the installed version's name."""
    return {CACHE_KWARG: cache}


def returned_cache(output):
    """The cache a generate() (return_dict_in_generate=True) or forward() output carries."""
    return getattr(output, CACHE_KWARG)
