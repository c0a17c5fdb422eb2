"""RULER-style synthetic long-context suite, offline and deterministic by seed.

Tasks (written for this project after the RULER task descriptions; haystacks are real offline text, so scores are
"RULER-style (haystack <source>)", not comparable to published RULER numbers):

    passkey        a 5-digit pass key hidden in the text
    niah_single    one "special magic number" needle (adjective-noun key -> 7-digit value)
    niah_multikey  4 needles with different keys; one is asked for
    niah_multivalue 4 needles with the same key; all 4 values are asked for
    vt             variable tracking: a chain VAR A = 12345, VAR B = VAR A, ... (4 hops); name every variable
    cwe            common-words extraction: a numbered word list; name the 10 most common words
    fwe            frequent-words extraction: Zipf-distributed coded words; name the 3 most frequent

Score per sample: fraction of reference strings contained in the prediction (case-insensitive; RULER's
string_match_all), x100; per task and length: the mean over samples.

    python -m eval.synthetic --caches full,kvcomp,kivi2 --lengths 4096,8192 --samples 20 --out eval/results/synth
"""

from __future__ import annotations

import argparse
import random
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval import common

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "fwe")
MAX_NEW_TOKENS = {"passkey": 16, "niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "vt": 48,
                  "cwe": 96, "fwe": 40}

ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "cold", "crimson", "curious", "dark",
    "distant", "dusty", "eager", "early", "empty", "faint", "fancy", "fierce", "gentle", "giant", "golden", "grand",
    "green", "hidden", "hollow", "humble", "icy", "jolly", "kind", "late", "lazy", "little", "lively", "lonely",
    "lucky", "misty", "narrow", "noble", "odd", "pale", "patient", "polite", "proud", "purple", "quiet", "rapid",
    "rare", "rough", "royal", "rusty", "silent", "silver", "sleepy", "smooth", "soft", "spicy", "steady", "sticky",
    "stormy", "sunny", "swift", "tall", "tender", "tiny", "velvet", "vivid", "warm", "wild", "wise", "young",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "basket", "beacon", "bicycle", "blanket", "bottle", "bridge", "bucket",
    "cabin", "camera", "candle", "canyon", "castle", "cherry", "cliff", "compass", "cottage", "crayon", "desert",
    "dolphin", "dragon", "drum", "engine", "falcon", "feather", "forest", "fountain", "garden", "glacier", "hammer",
    "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "meadow", "mirror", "monkey",
    "needle", "orchard", "otter", "paddle", "parrot", "pebble", "pencil", "piano", "pillow", "planet", "pocket",
    "rabbit", "ribbon", "river", "rocket", "saddle", "shovel", "spoon", "statue", "tiger", "tomato", "trumpet",
    "tunnel", "turtle", "umbrella", "valley", "violin", "wagon", "walnut", "window", "wizard", "zebra",
)

# Sentences of the haystack that look like a needle would make the answer ambiguous: they are dropped.
NEEDLE_LIKE = re.compile(r"magic number|pass ?key|\bVAR\b|\d{5,}", re.IGNORECASE)


@dataclass
class Sample:
    task: str
    length: int
    index: int
    prompt: str                  # the user message (goes through the chat template)
    answer_prefix: str           # appended after the assistant turn starts
    references: list[str]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.length}/{self.index}"


# --------------------------------------------------------------------------------------------- scoring


def postprocess(prediction: str) -> str:
    """Strip and turn control characters into newlines (as RULER does before matching)."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "\n", prediction.strip())


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of references contained (case-insensitive) in the prediction, in [0, 1]."""
    if not references:
        return 0.0
    pred = postprocess(prediction).lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 if any reference is contained in the prediction (RULER's QA metric)."""
    pred = postprocess(prediction).lower()
    return float(any(r.lower() in pred for r in references))


def score_sample(task: str, prediction: str, references: list[str]) -> float:
    return 100.0 * string_match_all(prediction, references)


# --------------------------------------------------------------------------------------------- haystack


def split_sentences(text: str) -> list[str]:
    """Regex sentence splitter (no NLTK data needed); keeps sentences of 3..80 words, drops needle-like ones."""
    text = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])", text)
    out = []
    for p in parts:
        p = p.strip()
        n = len(p.split())
        if 3 <= n <= 80 and not NEEDLE_LIKE.search(p):
            out.append(p)
    return out


class Haystack:
    """Contiguous runs of real sentences, sized in tokens of the target tokenizer."""

    def __init__(self, text: str, tokenizer, name: str = "text"):
        self.name = name
        self.sentences = split_sentences(text)
        if len(self.sentences) < 50:
            raise ValueError(f"text source {name!r} has too few usable sentences ({len(self.sentences)})")
        self.tokenizer = tokenizer
        self._lens: dict[int, int] = {}

    def n_tokens(self, i: int) -> int:
        if i not in self._lens:
            self._lens[i] = len(self.tokenizer(" " + self.sentences[i], add_special_tokens=False)["input_ids"])
        return self._lens[i]

    def take(self, rng: random.Random, n_tokens: int) -> list[str]:
        """Consecutive sentences from a random start (wrapping around) totalling at most n_tokens tokens."""
        out: list[str] = []
        if n_tokens <= 0:
            return out
        i = rng.randrange(len(self.sentences))
        total = 0
        while total + self.n_tokens(i) <= n_tokens:  # never more than n_tokens
            total += self.n_tokens(i)
            out.append(self.sentences[i])
            i = (i + 1) % len(self.sentences)
            if len(out) > 10 * len(self.sentences):
                break
        return out


def insert_at_depths(sentences: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Insert each needle at the sentence boundary nearest to its depth (0 = start, 1 = end)."""
    out = list(sentences)
    for needle, depth in sorted(zip(needles, depths), key=lambda x: -x[1]):
        pos = int(round(depth * len(sentences)))
        out.insert(min(max(pos, 0), len(out)), needle)
    return out


# --------------------------------------------------------------------------------------------- generators


def _magic_key(rng: random.Random, used: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in used:
            used.add(key)
            return key


def _number(rng: random.Random, digits: int, used: set[str] | None = None) -> str:
    while True:
        s = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if used is None or s not in used:
            if used is not None:
                used.add(s)
            return s


def _depths(rng: random.Random, n: int) -> list[float]:
    return [rng.choice([i / 20 for i in range(1, 20)]) for _ in range(n)]


NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n")


def gen_passkey(rng, hay: Haystack, budget: int) -> tuple[str, str, list[str], dict]:
    key = _number(rng, 5)
    depth = _depths(rng, 1)
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about the important information there.\n")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    sents = insert_at_depths(hay.take(rng, budget), [needle], depth)
    return intro + " ".join(sents) + "\nWhat is the pass key?", "The pass key is", [key], {"depth": depth[0]}


def _niah(rng, hay: Haystack, budget: int, n_keys: int, n_values: int, query_all_values: bool):
    used_k: set[str] = set()
    used_v: set[str] = set()
    keys = [_magic_key(rng, used_k) for _ in range(n_keys)]
    needles, answers = [], {}
    for k in keys:
        vals = [_number(rng, 7, used_v) for _ in range(n_values)]
        answers[k] = vals
        needles += [f"One of the special magic numbers for {k} is: {v}." for v in vals]
    query = keys[0] if n_keys == 1 else rng.choice(keys)
    depths = _depths(rng, len(needles))
    sents = insert_at_depths(hay.take(rng, budget), needles, depths)
    if query_all_values:
        question = f"What are all the special magic numbers for {query} mentioned in the provided text?"
        prefix = f"The special magic numbers for {query} mentioned in the provided text are"
    else:
        question = f"What is the special magic number for {query} mentioned in the provided text?"
        prefix = f"The special magic number for {query} mentioned in the provided text is"
    prompt = NIAH_INTRO + " ".join(sents) + "\n" + question
    return prompt, prefix, answers[query], {"depths": depths, "query": query, "n_needles": len(needles)}


def gen_niah_single(rng, hay, budget):
    return _niah(rng, hay, budget, n_keys=1, n_values=1, query_all_values=False)


def gen_niah_multikey(rng, hay, budget):
    return _niah(rng, hay, budget, n_keys=4, n_values=1, query_all_values=False)


def gen_niah_multivalue(rng, hay, budget):
    return _niah(rng, hay, budget, n_keys=1, n_values=4, query_all_values=True)


def _var_name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in used:
            used.add(name)
            return name


def gen_vt(rng, hay, budget, hops: int = 4):
    used: set[str] = set()
    names = [_var_name(rng, used) for _ in range(hops + 1)]
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(_depths(rng, len(chain)))  # keep the chain in order through the text
    sents = hay.take(rng, budget)
    out = list(sents)
    for j, (stmt, d) in enumerate(zip(chain, depths)):
        pos = int(round(d * len(sents))) + j
        out.insert(min(pos, len(out)), stmt)
    prompt = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
              + " ".join(out) + f"\nQuestion: Find all variables that are assigned the value {value} in the text "
              "above.")
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
              f"are assigned the value {value}, they are:")
    return prompt, prefix, names, {"value": value}


def corpus_words(text: str, min_len: int = 4) -> list[str]:
    """Distinct lowercase alphabetic words of the text, in first-appearance order."""
    seen: dict[str, None] = {}
    for w in re.findall(r"[A-Za-z]+", text):
        w = w.lower()
        if len(w) >= min_len and w not in seen:
            seen[w] = None
    return list(seen)


def gen_cwe(rng, hay, budget, words: list[str], tokenizer, num_cw: int = 10):
    # tokens per list entry ("12. word ") ~ measured on a sample of the vocabulary
    probe = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words[:200]))
    per_entry = max(len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / 200, 1.0)
    entries = max(int(budget / per_entry), 4 * num_cw)
    freq_cw = max(2, min(30, int(0.4 * entries / num_cw)))
    freq_ucw = 3 if freq_cw >= 10 else 1
    n_ucw = max((entries - freq_cw * num_cw) // freq_ucw, 1)
    pool = rng.sample(words, min(len(words), num_cw + n_ucw))
    common_words, uncommon = pool[:num_cw], pool[num_cw:]
    lst = common_words * freq_cw + uncommon * freq_ucw
    rng.shuffle(lst)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst))
    prompt = (f"Below is a numbered list of words. In these words, some appear more often than others. "
              f"Memorize the ones that appear most often.\n{listing}\nQuestion: What are the {num_cw} most common "
              f"words in the above list?")
    prefix = f"Answer: The top {num_cw} words that appear most often in the list are:"
    return prompt, prefix, common_words, {"freq_cw": freq_cw, "freq_ucw": freq_ucw, "n_entries": len(lst)}


def gen_fwe(rng, hay, budget, tokenizer, alpha: float = 2.0, vocab: int = 400):
    coded = []
    used: set[str] = set()
    while len(coded) < vocab:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
        if w not in used:
            used.add(w)
            coded.append(w)
    weights = [1.0 / (r + 1) ** alpha for r in range(vocab)]
    per_word = max(len(tokenizer(" ".join(coded[:100]), add_special_tokens=False)["input_ids"]) / 100, 1.0)
    n = max(int(budget / per_word), 50)
    draws = rng.choices(coded, weights=weights, k=n)
    counts = Counter(draws)
    ranked = [w for w, _ in counts.most_common()]
    # make the top 3 strictly more frequent than the 4th so the answer is unique
    while len(ranked) > 3 and counts[ranked[2]] == counts[ranked[3]]:
        draws.append(ranked[2])
        counts[ranked[2]] += 1
        ranked = [w for w, _ in counts.most_common()]
    rng.shuffle(draws)
    text = " ".join(draws[i] + (" ...." if (i + 1) % 20 == 0 else "") for i in range(len(draws)))
    prompt = ("Read the following coded text and track the frequency of each coded word. Find the three most "
              f"frequently appeared coded words.\n{text}\nQuestion: Do not provide any explanation. Please ignore "
              "the dots '....'. What are the three most frequently appeared words in the above coded text?")
    prefix = ("Answer: According to the coded text above, the three most frequently appeared words are:")
    return prompt, prefix, ranked[:3], {"n_words": len(draws)}


class SyntheticSuite:
    """Builds samples of the tasks at token lengths for one tokenizer, deterministically from the seed."""

    def __init__(self, tokenizer, text_source: str = "auto", seed: int = 42, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        self.seed = seed
        self.use_chat_template = use_chat_template
        self.source_name, text = common.load_text(text_source, order=common.HAYSTACK_ORDER)
        self.text_sha256 = common.text_sha256(text)
        self.haystack = Haystack(text, tokenizer, self.source_name)
        self.words = [w for w in corpus_words(text) if not NEEDLE_LIKE.search(w)]

    def prompt_ids(self, prompt: str, prefix: str) -> list[int]:
        ids = common.chat_prompt_ids(self.tokenizer, prompt, self.use_chat_template)
        return ids + self.tokenizer(prefix, add_special_tokens=False)["input_ids"]

    def _build(self, task: str, rng: random.Random, budget: int):
        hay = self.haystack
        if task == "passkey":
            return gen_passkey(rng, hay, budget)
        if task == "niah_single":
            return gen_niah_single(rng, hay, budget)
        if task == "niah_multikey":
            return gen_niah_multikey(rng, hay, budget)
        if task == "niah_multivalue":
            return gen_niah_multivalue(rng, hay, budget)
        if task == "vt":
            return gen_vt(rng, hay, budget)
        if task == "cwe":
            return gen_cwe(rng, hay, budget, self.words, self.tokenizer)
        if task == "fwe":
            return gen_fwe(rng, hay, budget, self.tokenizer)
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")

    def sample(self, task: str, length: int, index: int) -> Sample:
        """One sample whose prompt (chat template and answer prefix included) plus generation fits `length` tokens."""
        max_new = MAX_NEW_TOKENS[task]
        target = length - max_new
        tol = max(8, target // 100)
        best = None
        lo, hi = 0, None  # haystack budgets known to fit / not to fit
        budget = target
        for _ in range(14):  # sentence token counts only approximate the joint tokenisation: search the budget
            rng = random.Random(f"{self.seed}/{task}/{length}/{index}")
            prompt, prefix, refs, meta = self._build(task, rng, budget)
            n = len(self.prompt_ids(prompt, prefix))
            if n <= target:
                if best is None or n > best[4]:
                    best = (prompt, prefix, refs, meta, n)
                if target - n <= tol:
                    break
                lo = budget
                nxt = budget + (target - n) if hi is None else (lo + hi) // 2
            else:
                hi = budget
                nxt = min(max(budget - (n - target), 0), (lo + hi) // 2)
            if nxt == budget:
                break
            budget = nxt
        if best is None:
            raise ValueError(f"{task}: the prompt alone needs {n} tokens, more than length {length} - {max_new}")
        prompt, prefix, refs, meta, n = best
        meta = dict(meta, prompt_tokens=n)
        return Sample(task, length, index, prompt, prefix, list(refs), max_new, meta)

    def samples(self, tasks, lengths, n_samples: int) -> list[Sample]:
        return [self.sample(t, L, i) for L in lengths for t in tasks for i in range(n_samples)]


# --------------------------------------------------------------------------------------------- running


def aggregate(records: list[dict], caches: list[str], tasks: list[str], lengths: list[int]) -> dict[str, Any]:
    scores: dict[str, Any] = {}
    bits: dict[str, Any] = {}
    for c in caches:
        scores[c] = {}
        bits[c] = {}
        for L in lengths:
            per_task = {}
            for t in tasks:
                vals = [r["score"] for r in records if r["cache"] == c and r["task"] == t and r["length"] == L]
                if vals:
                    per_task[t] = round(sum(vals) / len(vals), 2)
            if per_task:
                per_task["avg"] = round(sum(per_task.values()) / len(per_task), 2)
                scores[c][str(L)] = per_task
            bpv = [r["bits_per_value"] for r in records
                   if r["cache"] == c and r["length"] == L and r.get("bits_per_value") is not None]
            if bpv:
                bits[c][str(L)] = round(sum(bpv) / len(bpv), 3)
    return {"scores": scores, "bits_per_value": bits}


def markdown_table(agg: dict[str, Any], caches: list[str], tasks: list[str], lengths: list[int],
                   kv_dtype: str | None = None) -> str:
    lines = []
    for L in lengths:
        lines.append(f"### {L} tokens\n")
        lines.append(f"| cache | {common.bits_header(kv_dtype)} | " + " | ".join(tasks) + " | avg |")
        lines.append("|---|---:|" + "---:|" * (len(tasks) + 1))
        for c in caches:
            row = agg["scores"].get(c, {}).get(str(L))
            if not row:
                continue
            b = agg["bits_per_value"].get(c, {}).get(str(L))
            cells = [f"{row[t]:.1f}" if t in row else "-" for t in tasks] + [f"{row['avg']:.1f}"]
            lines.append(f"| {c} | {b if b is not None else '-'} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run_samples(model, tokenizer, suite: SyntheticSuite, samples: list[Sample], specs: list[common.CacheSpec],
                preds: common.ResumableJsonl, desc: str = "synthetic") -> list[dict]:
    """Generate and score every (spec, sample) not yet in `preds` (keyed by (cache, sample key)); returns all
    records of these specs and samples."""
    todo = [(s, sp) for sp in specs for s in samples if (sp.name, s.key) not in preds]
    bar = common.progress(total=len(todo), desc=desc)
    for s, sp in todo:
        ids = suite.prompt_ids(s.prompt, s.answer_prefix)
        t0 = time.time()
        text, info = common.greedy_generate(model, tokenizer, ids, s.max_new_tokens, sp)
        rep = info["cache"]
        preds.append({"cache": sp.name, "key": s.key, "task": s.task, "length": s.length, "index": s.index,
                      "prompt_tokens": info["prompt_tokens"], "prediction": text, "references": s.references,
                      "score": score_sample(s.task, text, s.references),
                      "bits_per_value": rep.get("bits_per_value"), "seconds": round(time.time() - t0, 2),
                      "meta": s.meta})
        bar.update(1)
        bar.set_postfix_str(f"{sp.name} {s.task}@{s.length}")
    bar.close()
    names = {sp.name for sp in specs}
    keys = {s.key for s in samples}
    return [r for r in preds.records if r["cache"] in names and r["key"] in keys]


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.set_seed(args.seed)
    specs = common.parse_cache_list(args.caches)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; tasks: {', '.join(TASKS)}")
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    out = Path(args.out or "eval/results/synthetic")
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = common.load_model(args.model, args.gguf_file, args.device, args.dtype)
    suite = SyntheticSuite(tokenizer, args.text, args.seed, use_chat_template=not args.no_chat_template)
    samples = suite.samples(tasks, lengths, args.samples)
    if args.limit:
        samples = samples[: args.limit]
    preds = common.ResumableJsonl(out / "predictions.jsonl", key=lambda r: (r["cache"], r["key"]))
    records = run_samples(model, tokenizer, suite, samples, specs, preds)
    cache_names = [sp.name for sp in specs]
    agg = aggregate(records, cache_names, tasks, lengths)
    result = {
        "suite": "synthetic", "model": common.model_label(args.model, args.gguf_file),
        "haystack": suite.source_name, "haystack_sha256": suite.text_sha256,
        "tasks": tasks, "lengths": lengths, "samples_per_task": args.samples, "caches": cache_names,
        "metric": "string_match_all x100 (RULER-style, haystack %s)" % suite.source_name,
        "kv_dtype": common.kv_dtype(model), **agg, "meta": common.run_metadata(args),
    }
    common.write_json(out / "scores.json", result)
    table = markdown_table(agg, cache_names, tasks, lengths, result["kv_dtype"])
    (out / "scores.md").write_text(f"# Synthetic suite: {result['model']} (haystack: {suite.source_name})\n\n"
                                   + table + f"\nCommand: `{result['meta']['command']}`\n", encoding="utf-8")
    print(table)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of " + ", ".join(TASKS))
    p.add_argument("--lengths", default="4096,8192", help="comma list of total token lengths (prompt + generation)")
    p.add_argument("--samples", type=int, default=10, help="samples per task and length")
    p.add_argument("--text", default="auto",
                   help="haystack text: auto | austen | handbook | cfi | pydoc | path to a text file")
    p.add_argument("--no-chat-template", action="store_true", help="feed the raw prompt (base models)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
