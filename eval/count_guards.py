"""Dynamo guards of a compiled decode step, per cache: what torch.compile checks on the host before every step.

    python -m eval.count_guards --layers 2,4

A tiny random bf16 Llama (CPU; kvcomp's kernels run in Triton's interpreter) is prefilled eagerly, then two
decode steps run under torch.compile (backend "eager": the guards do not depend on the backend). Prints the
guards by kind (the guard log itself goes to stderr) for transformers' StaticCache and the static kvcomp cache at
each layer count; the difference between two layer counts is the per-layer cost, which a 32-layer model pays 32
times per step (issue 14: the
compiled 32K x 8 step is host-bound for 3.5 ms, `eval/results/h100-default-fixed-v/profile_decode_32k_compiled.json`).
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import os
import re

KINDS = ("TENSOR_MATCH", "TYPE_MATCH", "ID_MATCH", "DICT_CONTAINS", "EQUALS_MATCH", "NO_TENSOR_ALIASING")
PROMPT = 300


def guards(cache_name: str, layers: int) -> collections.Counter:
    import torch
    from transformers import StaticCache

    import kvcomp_hf
    from eval.common import TINY_LLAMA, llama_config, random_llama

    model = random_llama(llama_config(TINY_LLAMA, 1024, num_hidden_layers=layers), "cpu", torch.bfloat16).eval()
    if cache_name == "kvcomp":
        model.set_attn_implementation("kvcomp")
        cache = kvcomp_hf.KVCompCache(model.config, "fast", max_cache_len=PROMPT + 8)
    else:
        cache = StaticCache(config=model.config, max_cache_len=PROMPT + 8)
    ids = torch.randint(3, 256, (1, PROMPT))
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    torch._dynamo.reset()
    with torch.no_grad():
        model(ids, past_key_values=cache, position_ids=torch.arange(PROMPT)[None], cache_position=torch.arange(PROMPT))
        torch._logging.set_logs(guards=True)
        logging.getLogger("torch._dynamo").addHandler(handler)
        try:
            step = torch.compile(model.forward, backend="eager")
            for pos in (PROMPT, PROMPT + 1):
                step(ids[:, -1:], past_key_values=cache, position_ids=torch.tensor([[pos]]),
                     cache_position=torch.tensor([pos]))
        finally:
            logging.getLogger("torch._dynamo").removeHandler(handler)
            torch._logging.set_logs()
    counts = collections.Counter()
    for line in log.getvalue().splitlines():
        counts["lines"] += 1
        found = re.search(r"\b(" + "|".join(KINDS) + r")\b", line)
        if found:
            counts[found.group(1)] += 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4", help="two layer counts: their difference gives the per-layer guards")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    counts = [int(x) for x in args.layers.split(",")]
    print("| cache | layers | guard lines | " + " | ".join(KINDS) + " |")
    print("|---|---:|---:|" + "---:|" * len(KINDS))
    for name in ("static", "kvcomp"):
        seen = [guards(name, n) for n in counts]
        for n, c in zip(counts, seen):
            print(f"| {name} | {n} | {c['lines']} | " + " | ".join(str(c[k]) for k in KINDS) + " |")
        if len(seen) == 2:
            per = {k: (seen[1][k] - seen[0][k]) / (counts[1] - counts[0]) for k in ("lines", *KINDS)}
            print(f"| {name} | per layer | {per['lines']:.0f} | " + " | ".join(f"{per[k]:.0f}" for k in KINDS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
