"""Shared plumbing of the evaluation scripts, one topic per module:

    specs        the cache-spec grammar (--caches, lm-eval's cache=) and the one cache factory
    models       model loading, device/dtype, the benchmark architectures with random weights, the tiny test model
    cli          the flags the accuracy scripts share
    texts        offline English text (no download)
    generation   chat prompts, greedy decoding with a cache spec, the timed generate() of the speed benchmarks
    accounting   bits per stored value and tensor bytes of a cache
    records      resumable JSONL, JSON output, run provenance, progress bars

The names below are re-exported so that scripts can write `from eval import common` and `common.load_model`.
"""

from eval.common.accounting import (bits_header, cache_bits_per_value, cache_numbers, cache_report, kv_bits, kv_dtype,
                                    tensor_bytes)
from eval.common.cli import add_common_args, set_seed
from eval.common.generation import StepTimer, chat_prompt_ids, eos_ids, greedy_generate, synchronize, timed_generate
from eval.common.models import (DTYPES, LLAMA31_8B, SMOLLM2_135M, SMOLLM2_GGUF, TINY_LLAMA, WEIGHTS_NOTE,
                                build_tiny_model, default_model_dir, detect_gguf_file, import_kvcomp, llama_config,
                                load_model, smollm2_or_random, model_label, random_llama, resolve_device, resolve_dtype)
from eval.common.records import REPO_ROOT, ResumableJsonl, progress, run_metadata, spec_to_dict, write_json
from eval.common.specs import (ALLOWED_SPEC_FORMS, CacheSpec, attention_for, generate_kwargs, hf_quant_backend,
                               hf_quant_candidates, hf_quantized_cache, make_cache, parse_cache_list,
                               parse_cache_spec, parse_value, sdpa_backends, split_cache_list,
                               working_hf_quant_backend)
from eval.common.texts import (HAYSTACK_ORDER, PERPLEXITY_ORDER, TEXT_SOURCES, html_to_text, load_text, pydoc_text,
                               text_sha256)

__all__ = [
    "add_common_args", "ALLOWED_SPEC_FORMS", "attention_for", "bits_header", "build_tiny_model",
    "cache_bits_per_value", "cache_numbers", "cache_report", "CacheSpec", "chat_prompt_ids", "default_model_dir",
    "detect_gguf_file", "DTYPES", "eos_ids", "generate_kwargs", "greedy_generate", "HAYSTACK_ORDER",
    "hf_quant_backend", "hf_quant_candidates", "hf_quantized_cache", "html_to_text", "import_kvcomp", "kv_bits",
    "kv_dtype", "LLAMA31_8B", "llama_config", "load_model", "load_text", "make_cache", "model_label",
    "parse_cache_list", "parse_cache_spec", "parse_value", "PERPLEXITY_ORDER", "progress", "pydoc_text",
    "random_llama", "REPO_ROOT", "resolve_device", "resolve_dtype", "ResumableJsonl", "run_metadata",
    "sdpa_backends", "set_seed", "SMOLLM2_135M", "SMOLLM2_GGUF", "smollm2_or_random", "spec_to_dict",
    "split_cache_list", "StepTimer", "synchronize", "tensor_bytes", "text_sha256", "TEXT_SOURCES", "timed_generate",
    "TINY_LLAMA", "WEIGHTS_NOTE", "working_hf_quant_backend", "write_json",
]
