"""kvcomp-hf: compressed KV cache for HuggingFace Transformers (KVComp / PackKV method)."""

from .config import KVCompConfig, available_presets, load_preset, preset

__all__ = ["KVCompConfig", "available_presets", "load_preset", "preset"]
__version__ = "0.1.0"
