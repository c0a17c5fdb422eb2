"""Triton kernels of kvcomp: compress (store) and fused decompress + attention (decode).

Kernels never import transformers; the byte format is kvcomp_hf/codec.py's."""

from .decode_attention import choose_splits, decode_attention
from .store import encode_blocks_triton, store_blocks

__all__ = ["store_blocks", "encode_blocks_triton", "decode_attention", "choose_splits"]
