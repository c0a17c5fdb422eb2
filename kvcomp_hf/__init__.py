"""kvcomp-hf: compressed KV cache for HuggingFace Transformers (KVComp / PackKV method).

`import kvcomp_hf` registers attn_implementation="kvcomp" and generate(cache_implementation="kvcomp").
"""

import importlib
import sys
from pathlib import Path

# An installed wheel carries kernels/ as kvcomp_hf.kernels; a bare source checkout (PYTHONPATH=.)
# finds it through the repository root.
_root = Path(__file__).resolve().parent.parent
if (_root / "kernels" / "__init__.py").is_file():
    __path__.append(str(_root))

# Public names, imported on first use (PEP 562), so that submodules which need no transformers
# (kvcomp_hf.config, the command line) load in a fraction of a second.
_PUBLIC = {"CompressedKV": "cache", "KVCompCache": "cache", "KVCompLayer": "cache", "check_supported": "cache",
           "CACHE_KWARG": "compat", "cache_kwargs": "compat", "returned_cache": "compat",
           "KVCompConfig": "config", "available_presets": "config", "load_preset": "config", "preset": "config",
           "custom_generate": "integration", "register": "integration"}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value


def _started_as_command() -> bool:
    """True inside the `kvcomp-hf` console script. Registering imports transformers (seconds); the command's
    --help, `presets` and argument checks need none of it, and `demo` registers before it loads the model."""
    main = sys.modules.get("__main__")
    return Path(getattr(main, "__file__", None) or "").stem == "kvcomp-hf"


if not _started_as_command():
    from .integration import register as _register

    _register()
