"""kvcomp-hf: compressed KV cache for HuggingFace Transformers (KVComp / PackKV method).

`import kvcomp_hf` registers attn_implementation="kvcomp" and generate(cache_implementation="kvcomp").
"""

from pathlib import Path

# An installed wheel carries kernels/ as kvcomp_hf.kernels; a bare source checkout (PYTHONPATH=.)
# finds it through the repository root.
_root = Path(__file__).resolve().parent.parent
if (_root / "kernels" / "__init__.py").is_file():
    __path__.append(str(_root))

from .cache import CompressedKV, KVCompCache, KVCompLayer, check_supported
from .compat import CACHE_KWARG, cache_kwargs, returned_cache
from .config import KVCompConfig, available_presets, load_preset, preset
from .integration import custom_generate, register

register()

__all__ = ["CACHE_KWARG", "CompressedKV", "KVCompCache", "KVCompConfig", "KVCompLayer", "available_presets",
           "cache_kwargs", "check_supported", "custom_generate", "load_preset", "preset", "register", "returned_cache"]
__version__ = "0.1.0"
