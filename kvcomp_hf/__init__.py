"""kvcomp-hf: compressed KV cache for HuggingFace Transformers (KVComp / PackKV method).

`import kvcomp_hf` registers attn_implementation="kvcomp" and generate(cache_implementation="kvcomp").
"""

from .cache import CompressedKV, KVCompCache, KVCompLayer, check_supported
from .config import KVCompConfig, available_presets, load_preset, preset
from .integration import custom_generate, register

register()

__all__ = ["CompressedKV", "KVCompCache", "KVCompConfig", "KVCompLayer", "available_presets", "check_supported",
           "custom_generate", "load_preset", "preset", "register"]
__version__ = "0.1.0"
