"""Triton kernels of kvcomp: compress (store) and fused decompress + attention (decode).

Kernels never import transformers; the byte format is kvcomp_hf/codec.py's."""

if __name__ == "kernels":
    # Imported as a top-level "kernels" because a source checkout's root is on sys.path: that name
    # belongs to a PyPI package that transformers probes for. Expose nothing, so the probe finds
    # no usable version instead of importing kvcomp_hf halfway through transformers' own import.
    __version__ = "N/A"
    __all__ = []
else:
    from .decode_attention import DecodeTuning, choose_tuning, decode_attention
    from .store import encode_blocks_triton, store_blocks

    __all__ = ["store_blocks", "encode_blocks_triton", "decode_attention", "DecodeTuning", "choose_tuning"]
