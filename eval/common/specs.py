"""The cache-spec grammar every evaluation script and the lm-eval model share, and the one factory that turns a
spec into a cache (or into the generate() arguments that select it).

One spec names one cache:

    full                          transformers' default DynamicCache, SDPA attention
    full:flash                    the same, SDPA limited to its flash and memory-efficient kernels
    static                        transformers' StaticCache (cache_implementation="static"), not compiled
    static:compiled               StaticCache with generate()'s automatic torch.compile of the forward (CUDA)
    kvcomp                        KVCompCache with the default KVCompConfig
    kvcomp:compiled               kvcomp's fastest decode: the static cache in the "fast" preset's format (layout
                                  "fixed", K and V 4 bits, rel 1/15) with generate()'s automatic torch.compile
                                  (CUDA graphs)
    kvcomp:<preset>               KVCompCache with configs/<preset>.yaml
    kvcomp:rel_k=0.05,rel_v=0.1   the default config with field overrides (';' may replace ',' where the
                                  surrounding list is itself comma-separated, e.g. lm-eval's --model_args)
    kvcomp:preset=<name>,rel_v=.. a preset with overrides
    kivi2, kivi4                  KIVI-style fake-quantised cache (eval/baselines.py), 2 or 4 bits
    hf-int2, hf-int4              transformers.QuantizedCache (optimum-quanto, else the hqq backend)

`dynamic` and `dynamic-flash` (the benchmark's former names) are read as `full` and `full:flash`.
In a comma list a comma starts a new entry unless the piece after it is a key=value continuation of a
kvcomp entry, so ``full,kvcomp:rel_k=0.1,rel_v=0.2,kivi2`` is three specs.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

ALLOWED_SPEC_FORMS = (
    "full",
    "full:flash",
    "static",
    "static:compiled",
    "kvcomp",
    "kvcomp:compiled",
    "kvcomp:<preset name>",
    "kvcomp:rel_k=<float>,rel_v=<float>,... (KVCompConfig fields)",
    "kvcomp:preset=<name>,<field>=<value>,...",
    "kivi2",
    "kivi4",
    "hf-int2",
    "hf-int4",
)
# kvcomp:compiled's format: configs/fast.yaml's (fixed 4-bit K and V in pair order, the layout the fused kernel
# reads fastest; kernels/NOTES.md), each rel using every code of its width (codec.bits_for_rel)
COMPILED_KVCOMP = (("layout", "fixed"), ("rel_k", 1 / 15), ("rel_v", 1 / 15))
LEGACY_NAMES = {"dynamic": "full", "dynamic-flash": "full:flash"}  # bench_generate's names before the grammar


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache spec. kind: full | static | kvcomp | kivi | hf-quant."""

    name: str                       # the spec string in canonical form, used as a result key
    kind: str
    variant: str | None = None      # full: "flash"; static, kvcomp: "compiled"
    preset: str | None = None       # kvcomp
    overrides: tuple = ()           # kvcomp: ((field, value), ...)
    nbits: int | None = None        # kivi / hf-quant
    options: tuple = field(default=())  # extra ((key, value), ...) for baselines

    def kvcomp_config(self):
        """The KVCompConfig this spec selects (kind kvcomp only)."""
        if self.kind != "kvcomp":
            raise ValueError(f"cache spec {self.name!r} is not a kvcomp spec")
        import kvcomp_hf

        values: dict[str, Any] = dict(self.overrides)
        if self.preset:
            values["preset"] = self.preset
        return kvcomp_hf.KVCompConfig.from_dict(values)


def _spec_error(spec: str, why: str) -> ValueError:
    return ValueError(f"bad cache spec {spec!r}: {why}. Allowed forms: " + "; ".join(ALLOWED_SPEC_FORMS))


def parse_value(text: str) -> Any:
    """A key=value value: bool, int, float, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _check_kvcomp(spec: str, values: dict[str, Any]) -> None:
    """Validate preset and field names now, not at cache-creation time."""
    try:
        import kvcomp_hf
    except ImportError:
        return
    try:
        kvcomp_hf.KVCompConfig.from_dict(values)
    except ValueError as err:
        raise _spec_error(spec, str(err)) from err


def _parse_kvcomp(spec: str, body: str) -> CacheSpec:
    body = body.replace(";", ",").strip()
    if not body:
        raise _spec_error(spec, "nothing after 'kvcomp:'")
    if "=" not in body:
        if "," in body or not re.fullmatch(r"[A-Za-z0-9_.\-]+", body):
            raise _spec_error(spec, f"{body!r} is not a preset name")
        _check_kvcomp(spec, {"preset": body})
        return CacheSpec(name=f"kvcomp:{body}", kind="kvcomp", preset=body)
    preset = None
    overrides = []
    for item in body.split(","):
        key, _, value = (s.strip() for s in item.partition("="))
        if not key or not value:
            raise _spec_error(spec, f"{item!r} is not key=value")
        if key == "preset":
            preset = value
        else:
            overrides.append((key, parse_value(value)))
    _check_kvcomp(spec, {**dict(overrides), **({"preset": preset} if preset else {})})
    return CacheSpec(name=f"kvcomp:{body}", kind="kvcomp", preset=preset, overrides=tuple(overrides))


def parse_cache_spec(spec: str | CacheSpec) -> CacheSpec:
    """Parse one cache spec (see the module docstring); ValueError naming the allowed forms on bad input."""
    if isinstance(spec, CacheSpec):
        return spec
    if not isinstance(spec, str):
        raise _spec_error(repr(spec), "not a string")
    text = spec.strip()
    low = LEGACY_NAMES.get(text.lower(), text.lower())
    if low == "full":
        return CacheSpec(name="full", kind="full")
    if low == "full:flash":
        return CacheSpec(name="full:flash", kind="full", variant="flash")
    if low == "static":
        return CacheSpec(name="static", kind="static")
    if low == "static:compiled":
        return CacheSpec(name="static:compiled", kind="static", variant="compiled")
    m = re.fullmatch(r"kivi([248])", low)
    if m:
        return CacheSpec(name=low, kind="kivi", nbits=int(m.group(1)))
    m = re.fullmatch(r"hf-int([248])", low)
    if m:
        return CacheSpec(name=low, kind="hf-quant", nbits=int(m.group(1)))
    if low == "kvcomp":
        return CacheSpec(name="kvcomp", kind="kvcomp")
    if low == "kvcomp:compiled":
        return CacheSpec(name="kvcomp:compiled", kind="kvcomp", variant="compiled", overrides=COMPILED_KVCOMP)
    if low.startswith("kvcomp:"):
        return _parse_kvcomp(spec, text[len("kvcomp:"):])
    raise _spec_error(spec, "unknown cache kind")


def split_cache_list(text: str) -> list[str]:
    """Split a --caches value: a comma starts a new entry unless the next piece is a key=value continuation."""
    pieces = [p.strip() for p in text.split(",") if p.strip()]
    entries: list[str] = []
    for piece in pieces:
        if entries and "=" in piece and ":" not in piece and entries[-1].lower().startswith("kvcomp:"):
            entries[-1] += "," + piece
        else:
            entries.append(piece)
    return entries


def parse_cache_list(text: str | Iterable[str]) -> list[CacheSpec]:
    """A --caches value (or a list of specs) -> CacheSpecs; ValueError on an empty list or duplicates."""
    items = split_cache_list(text) if isinstance(text, str) else list(text)
    if not items:
        raise _spec_error(str(text), "empty cache list")
    specs = [parse_cache_spec(s) for s in items]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate cache specs in {names}")
    return specs


# --------------------------------------------------------------------------------------------- QuantizedCache

HF_QUANT_BACKENDS = ("quanto", "hqq")
HF_QUANT_MODULES = {"quanto": "optimum.quanto", "hqq": "hqq"}


def hf_quant_candidates() -> tuple[str, ...]:
    """QuantizedCache backends to try, in order: $KVCOMP_HF_QUANT_BACKEND alone if set, else all."""
    chosen = os.environ.get("KVCOMP_HF_QUANT_BACKEND")
    if chosen is None:
        return HF_QUANT_BACKENDS
    if chosen not in HF_QUANT_BACKENDS:
        raise ValueError(f"KVCOMP_HF_QUANT_BACKEND must be one of {HF_QUANT_BACKENDS}, got {chosen!r}")
    return (chosen,)


def hf_quant_backend() -> str:
    """transformers.QuantizedCache's backend: $KVCOMP_HF_QUANT_BACKEND if set, else the first that imports."""
    candidates = hf_quant_candidates()
    for backend in candidates:
        try:
            __import__(HF_QUANT_MODULES[backend])
            return backend
        except ImportError:
            continue
    raise RuntimeError("hf-int2/hf-int4 need transformers.QuantizedCache with a backend: "
                       f"`pip install optimum-quanto` (or `pip install hqq`); none imports of {candidates}")


def _unpack_bits(packed, bits: int):
    """quanto's unpack (values of `bits` bits packed into uint8, low bits first, unpacked along dim 0)."""
    import torch

    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)]).to(torch.uint8)


def _quanto_unpack_without_cuda_build() -> None:
    """On CUDA, quanto's unpack calls its CUDA extension, which is built on first use together with its matmul
    kernels (Marlin, AWQ: minutes of nvcc). QuantizedCache needs only the unpack: give the extension the same
    shift-and-mask in PyTorch instead of building it."""
    import torch

    if not torch.cuda.is_available():
        return
    from types import SimpleNamespace

    from optimum.quanto.library.extensions import get_extension, is_extension_available

    if is_extension_available("quanto_cuda"):
        ext = get_extension("quanto_cuda")
        if ext._lib is None:
            ext._lib = SimpleNamespace(unpack=_unpack_bits)


def hf_quantized_cache(config, nbits: int, backend: str | None = None):
    """transformers.QuantizedCache with per-channel groups of 64 and a 128-token residual."""
    from transformers import QuantizedCache

    backend = backend or hf_quant_backend()
    if backend == "quanto":
        _quanto_unpack_without_cuda_build()
    # quanto: axis 0 = per-channel groups (transformers' documented default); hqq uses axis 1 for the same.
    axis = 0 if backend == "quanto" else 1
    return QuantizedCache(backend=backend, config=config, nbits=nbits, axis_key=axis, axis_value=axis,
                          q_group_size=64, residual_length=128)


def working_hf_quant_backend(config, device, dtype) -> tuple[str | None, list[str]]:
    """The first QuantizedCache backend that imports *and* quantises a small K/V on `device`
    ($KVCOMP_HF_QUANT_BACKEND narrows the choice); returns (backend or None, why the others failed)."""
    import torch

    failures = []
    for backend in hf_quant_candidates():
        try:
            cache = hf_quantized_cache(config, 4, backend)
            heads, dim = config.num_key_value_heads, config.head_dim
            kv = torch.randn(1, heads, 300, dim, device=device, dtype=dtype)
            cache.update(kv, kv, 0)
            cache.update(kv[:, :, :1], kv[:, :, :1], 0)
            return backend, failures
        except Exception as err:  # noqa: BLE001 - any failure means unusable here
            failures.append(f"{backend}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
    return None, failures


# --------------------------------------------------------------------------------------------- the factory


def make_cache(spec: str | CacheSpec, model, max_cache_len: int | None = None) -> Any:
    """A fresh cache object for one sequence (None = let transformers create its default DynamicCache).

    static needs `max_cache_len` (prompt + new tokens): a StaticCache is allocated at its final size.
    """
    spec = parse_cache_spec(spec)
    config = model.config if hasattr(model, "config") else model
    if spec.kind == "full":
        return None
    if spec.kind == "static":
        if not max_cache_len:
            raise ValueError(f"cache spec {spec.name!r} needs max_cache_len (prompt + new tokens)")
        from transformers import StaticCache

        return StaticCache(config=config, max_cache_len=max_cache_len)
    if spec.kind == "kvcomp":
        import kvcomp_hf

        if spec.variant == "compiled" and not max_cache_len:
            raise ValueError(f"cache spec {spec.name!r} needs max_cache_len (prompt + new tokens)")
        return kvcomp_hf.KVCompCache(config, spec.kvcomp_config(),
                                     max_cache_len=max_cache_len if spec.variant == "compiled" else None)
    if spec.kind == "kivi":
        from eval.baselines import KIVICache

        return KIVICache(config, nbits=spec.nbits, **dict(spec.options))
    if spec.kind == "hf-quant":
        return hf_quantized_cache(config, spec.nbits)
    raise _spec_error(spec.name, "unknown kind")


def attention_for(spec: str | CacheSpec) -> str:
    """The attention implementation a spec runs with: kvcomp's for kvcomp (plain SDPA on ordinary tensors)."""
    return "kvcomp" if parse_cache_spec(spec).kind == "kvcomp" else "sdpa"


def generate_kwargs(spec: str | CacheSpec, model) -> dict:
    """Switch the model's attention for `spec` and return the generate() arguments that select its cache.

    kvcomp goes through transformers' cache registry (cache_implementation="kvcomp", the path a user takes);
    static through cache_implementation="static", compiled only for static:compiled; the baselines as a cache
    object. Use together with sdpa_backends(spec).
    """
    from kvcomp_hf.compat import CACHE_KWARG

    spec = parse_cache_spec(spec)
    model.set_attn_implementation(attention_for(spec))
    if spec.kind == "full":
        return {}
    if spec.kind == "static":
        return {"cache_implementation": "static", "disable_compile": spec.variant != "compiled"}
    if spec.kind == "kvcomp" and spec.variant == "compiled":
        return {"cache_implementation": "kvcomp", "cache_config": {**spec.kvcomp_config().to_dict(), "static": True},
                "disable_compile": False}
    if spec.kind == "kvcomp":
        return {"cache_implementation": "kvcomp", "cache_config": spec.kvcomp_config().to_dict()}
    return {CACHE_KWARG: make_cache(spec, model)}


def sdpa_backends(spec: str | CacheSpec):
    """full:flash runs SDPA limited to its flash and memory-efficient kernels. On the H100 (torch 2.11, bf16)
    SDPA picks cuDNN attention, whose host-side cost per decode call (about 1.65 ms, eval/profile_decode.py)
    makes DynamicCache decode host-bound; full:flash shows DynamicCache without that cost."""
    if parse_cache_spec(spec).variant != "flash":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
