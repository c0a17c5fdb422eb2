"""The one configuration object of kvcomp, and the per-model presets in configs/*.yaml."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

PACK_SIZES = (4, 8, 16, 64)
REPACK_METHODS = ("none", "median")
GRANULARITIES = ("token", "token_head")
LAYOUTS = ("packed", "fixed", "fixed_v")  # kvcomp_hf/codec.py specifies them; "auto" picks one (KVCompConfig)
ROTATIONS = ("none", "hadamard")  # kvcomp_hf.rotation documents the transform
BACKENDS = ("auto", "torch", "triton")  # KVCompCache(..., backend=): Triton kernels on CUDA, PyTorch, or either
TAIL_BITS = 8  # tail_bits' one integer width (codec stage 5)
MIN_RESIDUAL = 0  # per-token quantisation needs no window of exact recent tokens (KIVI's per-channel K does)
MAX_SINK_TOKENS = 64  # exact tokens cost 16 bits per value; more than a block's worth buys nothing measured
MIN_REL = 1e-4  # keeps the quantised integers within 14 bits (see codec.bits_for_rel)
MAX_REL = 1.0

MAX_FIXED_BITS = 7  # the fused kernel's operand trick (bf16 bits 0x4300 | q = 128 + q) needs q < 128
MAX_BITS = 16  # fields are read through 3-byte windows: offset-in-byte (<= 7) + bits <= 24


def bits_for_rel(rel: float) -> int:
    """Bits that hold every integer the quantiser can produce at this rel.

    q <= (M - m) / step with step >= rel * (M - m) * (1 - 2**-7) after rounding to bf16, so
    q <= 1 / rel * (1 + 2**-6) for all practical float32 rounding."""
    q_max = math.floor(1.0 / rel * (1.0 + 2.0**-6) + 0.5)
    bits = max(1, q_max.bit_length())
    if bits > MAX_BITS:
        raise ValueError(f"rel={rel} needs {bits} bits per value; at most {MAX_BITS} are supported")
    return bits


# A source checkout reads <repo>/configs; an installed wheel carries the same files as kvcomp_hf.configs.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def _is_int(value) -> bool:
    return type(value) is int


@dataclass(frozen=True)
class KVCompConfig:
    """How the KV cache is compressed.

    rel_k, rel_v: relative quantisation step: step = rel * (max - min) of a token's values (per
        token, or per token and KV head), so every value is reconstructed within step / 2.
    block_size: tokens per compressed block (repacking and the block table work in these units).
    residual_length: the most recent tokens kept uncompressed in the model dtype (blocks are compressed once
        residual_length + 64 tokens wait, so the tail holds residual_length to residual_length + 63 of them).
    sink_tokens: the first tokens of every sequence kept uncompressed in the model dtype (attention
        sinks: most heads put much of their weight on them, so their quantisation error reaches every
        query). Blocks start after them.
    pack_size: tokens per bit-packing pack (one channel): each pack stores its own min and width.
        64 (one pack per channel and block) is what the fused decode kernel reads fastest.
    repack: token order inside a block before bit-packing ("none" keeps arrival order,
        "median" sorts tokens by the median of their quantised V values; with pack_size 64 the
        order changes no byte, so "none" is the default).
    granularity: "token" = one (min, step) per token across all KV heads (PackKV);
        "token_head" = one per token and KV head (no coupling between heads).
    layout: "auto" (default) stores blocks as "fixed_v" when pack_size is 64, repack "none" and both rels
        need at most 7 bits (rel >= 1/125), else as "packed" (`storage_layout` says which). "fixed_v" packs K
        and stores V fixed: V's packs rarely need fewer bits than its fixed width, so its pack metadata cost
        more bytes than its variable widths saved, and the decode skips V's variable unpack (the values of
        "packed", ~0.5% fewer bytes, ~1.2x faster decode; README "Configuration"). "packed" stores each pack's
        minimum and bit width and only the bits each pack needs, for K and V; "fixed" stores every value in
        exactly bits_for_rel(rel) bits, no pack metadata, every segment the same size (trades bytes for a
        simpler, faster decode; pairs with rel = 1 / (2**bits - 1), which uses every code of the width).
        "fixed" and "fixed_v" need pack_size 64, repack "none" and rels of at most 7 bits.
    rotation: "hadamard" stores K and V multiplied by a randomised Hadamard matrix along head_dim
        (one per layer, K/V and KV head, from rotation_seed), which spreads outlier channels so the
        per-token range is used by all channels; "none" stores them as they are.
    rotation_seed: int seed of the rotation's random signs (part of the format).
    tail_bits: None keeps the tail (the tokens not yet in a block) in the model dtype; 8 stores each of its
        tokens past the sinks as 8-bit codes per KV head over head_dim, with the token's min and max in the
        model dtype (codec stage 5): about half the tail's bytes, so a longer residual_length costs what a
        shorter one did. The eager cache only (a static cache's ring stays in the model dtype).
    """

    rel_k: float = 0.08
    rel_v: float = 0.3
    block_size: int = 64
    residual_length: int = 128
    sink_tokens: int = 4
    pack_size: int = 64
    repack: str = "none"
    granularity: str = "token"
    layout: str = "auto"
    rotation: str = "hadamard"
    rotation_seed: int = 0
    tail_bits: int | None = None

    def __post_init__(self):
        for name in ("rel_k", "rel_v"):
            value = getattr(self, name)
            # any real number (numpy's float32 included), not a bool; stored as a Python float
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number in [{MIN_REL}, {MAX_REL}], got {value!r}")
            if not MIN_REL <= value <= MAX_REL:
                raise ValueError(f"{name} must be in [{MIN_REL}, {MAX_REL}], got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("block_size", "residual_length", "sink_tokens", "pack_size", "tail_bits"):
            value = getattr(self, name)  # integers only (numpy's included): 16.0 is refused, not truncated
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))
        if not _is_int(self.block_size) or self.block_size != 64:
            raise ValueError(f"block_size must be 64 (the only block size the kernels support), got {self.block_size!r}")
        if not _is_int(self.residual_length) or self.residual_length < MIN_RESIDUAL:
            raise ValueError(f"residual_length must be an int >= {MIN_RESIDUAL}, got {self.residual_length!r}")
        if not _is_int(self.sink_tokens) or not 0 <= self.sink_tokens <= MAX_SINK_TOKENS:
            raise ValueError(f"sink_tokens must be an int in [0, {MAX_SINK_TOKENS}], got {self.sink_tokens!r}")
        if not _is_int(self.pack_size) or self.pack_size not in PACK_SIZES:
            raise ValueError(f"pack_size must be one of {PACK_SIZES} (an int), got {self.pack_size!r}")
        if self.repack not in REPACK_METHODS:
            raise ValueError(f"repack must be one of {REPACK_METHODS}, got {self.repack!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.layout != "auto" and self.layout not in LAYOUTS:
            raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {self.layout!r}")
        if self.layout not in ("auto", "packed") and (self.pack_size != 64 or self.repack != "none"):
            raise ValueError(f"layout={self.layout!r} stores whole channels of a block in arrival order: it needs "
                             f"pack_size=64 and repack='none' (other packs need layout='packed'), got "
                             f"pack_size={self.pack_size!r}, repack={self.repack!r}")
        wide = self._wide_rels()
        if self.layout not in ("auto", "packed") and wide:
            raise ValueError(f"layout={self.layout!r} stores at most {MAX_FIXED_BITS} bits per value (rel >= 1/125; "
                             f"tighter rels need layout='packed'): {', '.join(wide)}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if isinstance(self.rotation_seed, bool) or not isinstance(self.rotation_seed, int) \
                or not 0 <= self.rotation_seed < 2**31:
            raise ValueError(f"rotation_seed must be an int in [0, 2**31), got {self.rotation_seed!r}")
        if self.tail_bits is not None and (not _is_int(self.tail_bits) or self.tail_bits != TAIL_BITS):
            raise ValueError(f"tail_bits must be None (the model dtype) or {TAIL_BITS}, got {self.tail_bits!r}")

    def _wide_rels(self) -> list[str]:
        return [f"{name}={getattr(self, name)} needs {bits_for_rel(getattr(self, name))}"
                for name in ("rel_k", "rel_v") if bits_for_rel(getattr(self, name)) > MAX_FIXED_BITS]

    @property
    def storage_layout(self) -> str:
        """The layout blocks are stored in: `layout` with "auto" resolved. Both candidates store the same
        quantised values; they differ only in bytes and decode speed."""
        if self.layout != "auto":
            return self.layout
        whole = self.pack_size == 64 and self.repack == "none" and not self._wide_rels()
        return "fixed_v" if whole else "packed"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, _chain: tuple[str, ...] = ()) -> KVCompConfig:
        """Build from a dict; a "preset" key loads that preset first and lets the other keys override it.
        (_chain: the presets being loaded, so a preset that names itself fails clearly.)"""
        if not isinstance(values, Mapping):
            raise ValueError(f"cache_config must be a dict of KVCompConfig fields (or a preset name), got "
                             f"{type(values).__name__} {values!r}")
        values = dict(values)
        base = load_preset(values.pop("preset"), _chain=_chain) if "preset" in values else cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown KVCompConfig field(s) {unknown}; allowed: {sorted(known)} and 'preset'")
        return dataclasses.replace(base, **values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _preset_dirs() -> list[Path]:
    dirs = [CONFIGS_DIR]
    try:
        from importlib.resources import files

        dirs.append(Path(str(files("kvcomp_hf.configs"))))
    except (ModuleNotFoundError, TypeError):
        pass
    return [d for d in dirs if d.is_dir()]


def available_presets() -> list[str]:
    return sorted({p.stem for d in _preset_dirs() for p in d.glob("*.yaml")})


def load_preset(name: str, *, _chain: tuple[str, ...] = ()) -> KVCompConfig:
    """Read configs/<name>.yaml (safe YAML). Its `config:` mapping holds KVCompConfig fields (and may name
    another preset to start from); everything else in the file (provenance, measurements) is documentation."""
    path = _preset_path(name)
    if name in _chain:
        raise ValueError(f"preset {name!r} names itself: {' -> '.join(_chain + (name,))}")
    return load_preset_file(path, _chain=_chain + (name,))


def _preset_path(name: str) -> Path:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"preset must be a preset name such as 'default', got {name!r}; "
                         f"available: {available_presets()}")
    path = next((d / f"{name}.yaml" for d in _preset_dirs() if (d / f"{name}.yaml").is_file()), None)
    if path is None:
        raise ValueError(f"unknown preset {name!r}; available: {available_presets()}")
    return path


def _read_preset_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"preset file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(f"preset file {path} must be a mapping with a 'config:' mapping of KVCompConfig fields")
    return data


def preset_info(name: str) -> dict[str, Any]:
    """What `kvcomp-hf presets` shows: whether the preset was calibrated (its file says `calibrated: true`),
    for which model, and the config it resolves to."""
    data = _read_preset_file(_preset_path(name))
    return {"calibrated": data.get("calibrated") is True, "model": data.get("model"),
            "config": load_preset(name).to_dict()}


def load_preset_file(path: str | Path, *, _chain: tuple[str, ...] = ()) -> KVCompConfig:
    path = Path(path)
    data = _read_preset_file(path)
    try:
        return KVCompConfig.from_dict(data["config"], _chain=_chain)
    except ValueError as err:
        raise ValueError(f"preset file {path}: {err}") from err


def preset(name: str) -> dict[str, Any]:
    """The preset as a cache_config dict, for generate(cache_config=kvcomp_hf.preset(name))."""
    return load_preset(name).to_dict()


def resolve_config(config: KVCompConfig | dict | str | None = None, **overrides) -> KVCompConfig:
    """Accept a KVCompConfig, a dict (optionally with "preset"), a preset name, or None (defaults)."""
    if config is None:
        config = {}
    if isinstance(config, str):
        config = {"preset": config}
    if isinstance(config, KVCompConfig):
        return dataclasses.replace(config, **overrides) if overrides else config
    if not isinstance(config, Mapping):
        KVCompConfig.from_dict(config)  # raises the error that names what is accepted
    return KVCompConfig.from_dict({**config, **overrides})
