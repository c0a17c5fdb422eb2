#!/usr/bin/env python
"""LongBench (v1, LongBench-E, LongBench v2) for one model and several KV caches, on the same samples.

    python -m eval.longbench --model <hub id or local dir> [--gguf-file F] --data-dir <LongBench/data> \\
        --tasks all|qasper,trec,... --caches full,kvcomp,kivi2 --out runs/lb [--max-length 7500] [--limit N] \\
        [--e | --v2]

Protocol (THUDM/LongBench at 2e00731f; see docs in eval/longbench_config.py):
  * prompt = dataset2prompt[task].format(**sample)
  * middle truncation of the *raw* prompt to --max-length tokens (head half + tail half, decoded and re-tokenized)
  * then the tokenizer's chat template (one user message, generation prompt), except for trec, triviaqa, samsum,
    lsht, lcc and repobench-p, which get the raw prompt (tokenized with the tokenizer's special tokens, as pred.py)
  * greedy decoding, batch 1, max_new_tokens = dataset2maxlen[task]; samsum stops at the first newline and
    generates at least one token; decode with skip_special_tokens
  * metrics exactly as LongBench/metrics.py + eval.py (max over gold answers, first line only for trec, triviaqa,
    samsum, lsht; task score = round(100 * mean, 2); -E buckets on the `length` field)
  * code_sim_score: fuzzywuzzy's fuzz.ratio with the python-Levenshtein backend, computed with rapidfuzz
    (rapidfuzz's InDel ratio rounded to an int, 0 when either string is empty: what fuzzywuzzy returns)
  * v2: prompts/0shot.txt, token middle truncation ids[:n//2] + ids[-n//2:], chat template, 128 new tokens,
    answer regex "The correct answer is (X)" after removing '*'; accuracy overall/easy/hard/short/medium/long.
    Decoding is greedy here (upstream samples at temperature 0.1).

Deviations from upstream (on purpose): stop ids are the union of the generation config's, the tokenizer's and
the usual end-of-turn tokens (avoids the Llama-3 eos pitfall); a LongBench-E bucket with no samples is null
(upstream: NaN); the per-sample all_classes is used (upstream: the last line's, identical in the real data).

Outputs under --out:
  scores.json   {"scores": {cache: {task: score}}, "averages": {cache: {...}}, "bits_per_value": {cache: b},
                 "buckets" (-E) / "v2" (v2) breakdowns, "n_samples", "meta"}
  scores.md     per-task table, 6-category averages (README), 16/15/8-task means, bits/value
  predictions/<cache>/<task>.jsonl   one line per sample ({"_id","pred","answers","all_classes","length",...},
                 readable by THUDM's eval.py); a rerun skips samples already there.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from eval import longbench_config as C

# ============================================================================================= metrics
# Each metric takes (prediction, ground_truth, **kwargs) and returns a score in [0, 1], as LongBench/metrics.py.

_CN_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟"
                   "〰〾〿–—‘’‛“”„‟…‧﹏.")
_EN_PUNCT = set(string.punctuation)
_ALL_PUNCT = set(string.punctuation + _CN_PUNCTUATION)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop ASCII punctuation, drop articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _EN_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lowercase, drop Chinese and ASCII punctuation, drop all whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ALL_PUNCT)
    return "".join(s.split())


def f1_score(prediction: list, ground_truth: list, **kwargs) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction)
    recall = 1.0 * num_same / len(ground_truth)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba_cut(text: str) -> list[str]:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    pred = [t for t in (normalize_zh_answer(x) for x in _jieba_cut(prediction)) if len(t) > 0]
    gold = [t for t in (normalize_zh_answer(x) for x in _jieba_cut(ground_truth)) if len(t) > 0]
    return f1_score(pred, gold)


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F of the pip package `rouge` (1.0.1); 0.0 on any exception (empty hypothesis, recursion, ...)."""
    from rouge import Rouge

    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # noqa: BLE001 - upstream uses a bare except
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    em_match_list = [c for c in kwargs["all_classes"] if c in prediction]
    # upstream removes from the list while iterating it, which skips the element after each removal; kept as-is
    for match_term in em_match_list:
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    if ground_truth in em_match_list:
        return 1.0 / len(em_match_list)
    return 0.0


def _id_fraction(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return float(sum(1 for n in numbers if str(n) == str(target)) / len(numbers))


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _id_fraction(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _id_fraction(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _id_fraction(prediction, ground_truth)


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy.fuzz.ratio with the python-Levenshtein backend, via rapidfuzz.

    fuzzywuzzy returns 100 for equal strings, else 0 when either string is empty, else
    int(round(100 * InDel similarity)); rapidfuzz.fuzz.ratio is that similarity unrounded. Checked equal to
    fuzzywuzzy 0.18 + python-Levenshtein 0.27 on 20,000 random pairs. (fuzzywuzzy without python-Levenshtein uses difflib,
    which can differ by several points; we pin the Levenshtein result.)
    """
    from rapidfuzz import fuzz

    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(fuzz.ratio(a, b)))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, ground_truth) / 100


METRICS = {
    "qa_f1_score": qa_f1_score, "qa_f1_zh_score": qa_f1_zh_score,
    "rouge_score": rouge_score, "rouge_zh_score": rouge_zh_score,
    "classification_score": classification_score,
    "retrieval_score": retrieval_score, "retrieval_zh_score": retrieval_zh_score,
    "count_score": count_score, "code_sim_score": code_sim_score,
}


def base_task(task: str) -> str:
    return task[:-2] if task.endswith("_e") else task


def score_sample(task: str, prediction: str, answers: Iterable[str], all_classes=None) -> float:
    """eval.py's per-sample score in [0, 1]: first-line rule, then the max of the metric over gold answers."""
    task = base_task(task)
    metric = METRICS[C.DATASET2METRIC[task]]
    if task in C.FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    score = 0.0
    for gold in answers:
        score = max(score, metric(prediction, gold, all_classes=all_classes))
    return score


def scorer(task: str, predictions: list[str], answers: list[list[str]], all_classes: list | None = None) -> float:
    """eval.py scorer: round(100 * mean sample score, 2). all_classes: one list per sample (or None)."""
    all_classes = all_classes if all_classes is not None else [None] * len(predictions)
    total = sum(score_sample(task, p, a, c) for p, a, c in zip(predictions, answers, all_classes))
    return round(100 * total / len(predictions), 2)


def scorer_e(task: str, predictions: list[str], answers: list[list[str]], lengths: list[int],
             all_classes: list | None = None) -> dict[str, float | None]:
    """eval.py scorer_e: per length bucket (0-4k, 4-8k, 8k+), round(100 * mean, 2); an empty bucket is None."""
    all_classes = all_classes if all_classes is not None else [None] * len(predictions)
    buckets: dict[str, list[float]] = {b: [] for b in C.E_BUCKETS}
    for p, a, n, c in zip(predictions, answers, lengths, all_classes):
        buckets[C.e_bucket(n)].append(score_sample(task, p, a, c))
    return {b: (round(100 * sum(v) / len(v), 2) if v else None) for b, v in buckets.items()}


# --------------------------------------------------------------------------------------------- LongBench v2

def extract_answer_v2(response: str) -> str | None:
    """v2 result extraction: after removing '*', 'The correct answer is (X)', else 'The correct answer is X'."""
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response)
    if match:
        return match.group(1)
    match = re.search(r"The correct answer is ([A-D])", response)
    return match.group(1) if match else None


def build_prompt_v2(item: dict) -> str:
    prompt = C.V2_PROMPT_0SHOT
    for key, field in (("$DOC$", "context"), ("$Q$", "question"), ("$C_A$", "choice_A"), ("$C_B$", "choice_B"),
                       ("$C_C$", "choice_C"), ("$C_D$", "choice_D")):
        prompt = prompt.replace(key, str(item[field]).strip())
    return prompt


def score_v2(records: list[dict]) -> dict[str, Any]:
    """result.py: accuracy (x100, 1 decimal) overall / easy / hard / short / medium / long, strict and with
    0.25 credit for an unparseable answer ("compensated"); plus counts."""
    groups: dict[str, list[dict]] = {"overall": list(records)}
    for r in records:
        groups.setdefault(str(r.get("difficulty")), []).append(r)
        groups.setdefault(str(r.get("length")), []).append(r)
    out: dict[str, Any] = {}
    for name in ("overall", "easy", "hard", "short", "medium", "long"):
        rs = groups.get(name, [])
        if not rs:
            out[name] = None
            out[name + "_compensated"] = None
            continue
        strict = sum(1.0 for r in rs if r.get("pred") is not None and r["pred"] == r["answer"])
        comp = strict + sum(0.25 for r in rs if r.get("pred") is None)
        out[name] = round(100 * strict / len(rs), 1)
        out[name + "_compensated"] = round(100 * comp / len(rs), 1)
    out["n"] = {name: len(groups.get(name, [])) for name in ("overall", "easy", "hard", "short", "medium", "long")}
    out["unparsed"] = sum(1 for r in records if r.get("pred") is None)
    return out


# ============================================================================================= averages

def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _r2(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def averages(task_scores: dict[str, float]) -> dict[str, Any]:
    """Category means and the 6-category averages (README), plus the plain 16/15/8-task means (KV-cache papers).

    Means over the tasks that were run; `*_missing` lists what a complete figure would still need."""
    out: dict[str, Any] = {}
    for lang, cats in (("en", C.CATEGORIES_EN), ("zh", C.CATEGORIES_ZH)):
        own = [t for cat, ts in cats.items() if cat != "Code" for t in ts]  # code is shared by both tables
        if not any(t in task_scores for t in own):
            continue
        cat_means = {}
        for cat, tasks in cats.items():
            have = [task_scores[t] for t in tasks if t in task_scores]
            if have:
                cat_means[cat] = _mean(have)
        out[f"categories_{lang}"] = {k: _r2(v) for k, v in cat_means.items()}
        out[f"avg_6cat_{lang}"] = _r2(_mean(list(cat_means.values())))
        out[f"avg_6cat_{lang}_missing"] = [t for ts in cats.values() for t in ts if t not in task_scores]
    for name, tasks in (("avg_16_en_code", C.TASKS_EN_CODE_16), ("avg_15_kivi", C.TASKS_KIVI_15),
                        ("avg_8_kivi", C.TASKS_KIVI_8)):
        have = [task_scores[t] for t in tasks if t in task_scores]
        if have:
            out[name] = _r2(_mean(have))
            out[name + "_missing"] = [t for t in tasks if t not in task_scores]
    if task_scores:
        out["avg_all_run"] = _r2(_mean(list(task_scores.values())))
    return out


# ============================================================================================= data

def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def load_task_data(task: str, data_dir: str | None, e: bool = False) -> list[dict]:
    """Samples of one LongBench task: <data_dir>/<task>[_e].jsonl (or <data_dir>/data/...), else the hub."""
    name = f"{task}_e" if e else task
    if data_dir:
        for cand in (Path(data_dir) / f"{name}.jsonl", Path(data_dir) / "data" / f"{name}.jsonl"):
            if cand.is_file():
                return _read_jsonl(cand)
        raise FileNotFoundError(f"{name}.jsonl not found in {data_dir} (expected the unzipped LongBench data.zip: "
                                f"<dir>/{name}.jsonl)")
    return _load_from_hub(name)


def _load_from_hub(name: str) -> list[dict]:
    """THUDM/LongBench from the hub (needs network): datasets.load_dataset, else data.zip via huggingface_hub."""
    errors = []
    try:
        import datasets

        ds = datasets.load_dataset("THUDM/LongBench", name, split="test")
        return [dict(r) for r in ds]
    except Exception as err:  # noqa: BLE001 - fall through to the zip
        errors.append(repr(err))
    try:
        import zipfile

        from huggingface_hub import hf_hub_download

        path = hf_hub_download("THUDM/LongBench", "data.zip", repo_type="dataset")
        with zipfile.ZipFile(path) as zf:
            with zf.open(f"data/{name}.jsonl") as f:
                return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
    except Exception as err:  # noqa: BLE001
        errors.append(repr(err))
    raise RuntimeError(f"could not load LongBench task {name!r} from the hub ({'; '.join(errors)}); download and "
                       "unzip LongBench's data.zip and pass --data-dir <dir with {task}.jsonl>")


def load_v2_data(data_dir: str | None) -> list[dict]:
    """LongBench v2: <data_dir>/data.json (JSON list, the official release) or *.jsonl; else the hub."""
    if data_dir:
        d = Path(data_dir)
        for cand in (d / "data.json", d / "longbench_v2.json", d / "longbench_v2.jsonl", d / "data.jsonl"):
            if cand.is_file():
                if cand.suffix == ".jsonl":
                    return _read_jsonl(cand)
                return json.loads(cand.read_text(encoding="utf-8"))
        raise FileNotFoundError(f"LongBench v2 data not found in {data_dir} (expected data.json from THUDM/LongBench-v2)")
    import datasets

    return [dict(r) for r in datasets.load_dataset("THUDM/LongBench-v2", split="train")]


def _sample_ids(samples: list[dict], prefix: str) -> list[str]:
    """Unique ids: the `_id` field, made unique with '#<index>' when the data repeats one; else '<task>-<index>'."""
    seen: set[str] = set()
    ids = []
    for i, s in enumerate(samples):
        sid = str(s.get("_id")) if s.get("_id") is not None else f"{prefix}-{i}"
        if sid in seen:
            sid = f"{sid}#{i}"
        seen.add(sid)
        ids.append(sid)
    return ids


# ============================================================================================= prompts

def build_prompt(task: str, sample: dict) -> str:
    return C.DATASET2PROMPT[base_task(task)].format(**sample)


def truncate_middle(tokenizer, prompt: str, max_length: int) -> tuple[str, bool]:
    """pred.py: if the raw prompt has more than max_length tokens (special tokens included), keep
    decode(ids[:half]) + decode(ids[-half:]) with half = int(max_length / 2). Returns (prompt, truncated)."""
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt, False
    half = int(max_length / 2)
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True)), True


def truncate_middle_v2(tokenizer, prompt: str, max_length: int) -> tuple[str, bool]:
    """v2 pred.py: ids = encode(prompt); if too long, decode(ids[:n//2] + ids[-n//2:], skip_special_tokens)."""
    ids = tokenizer.encode(prompt)
    if len(ids) <= max_length:
        return prompt, False
    ids = ids[:max_length // 2] + ids[-max_length // 2:]
    return tokenizer.decode(ids, skip_special_tokens=True), True


def uses_chat_template(tokenizer, task: str, chat: bool = True) -> bool:
    return bool(chat and getattr(tokenizer, "chat_template", None) and base_task(task) not in C.NO_CHAT_TASKS)


def encode_prompt(tokenizer, prompt: str, use_chat: bool) -> list[int]:
    """Chat template (one user message + generation prompt) or the raw prompt with the tokenizer's special tokens."""
    from eval.common import chat_prompt_ids

    if use_chat:
        return chat_prompt_ids(tokenizer, prompt, use_chat_template=True)
    return list(tokenizer(prompt, truncation=False)["input_ids"])


def newline_token_id(tokenizer) -> int:
    return tokenizer.encode("\n", add_special_tokens=False)[-1]


# ============================================================================================= generation

def generate_one(model, tokenizer, input_ids: list[int], max_new_tokens: int, spec, stop_ids: list[int],
                 min_new_tokens: int = 0) -> tuple[str, dict]:
    """Greedy decode with a fresh cache of `spec`; returns (text, info) with token counts and bits/value."""
    from eval.common import cache_bits_per_value, greedy_generate

    text, info = greedy_generate(model, tokenizer, input_ids, max_new_tokens, spec, stop_ids=stop_ids,
                                 min_new_tokens=min_new_tokens)
    bpv = info["cache"].get("bits_per_value")
    if bpv is None:  # a cache without a usable report: estimate from the spec
        bpv = cache_bits_per_value(spec, model, tokens=info["prompt_tokens"] + info["new_tokens"])
    return text, {"prompt_tokens": info["prompt_tokens"], "new_tokens": info["new_tokens"], "bits_per_value": bpv}


# ============================================================================================= runner

def cache_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name.replace("=", "-")).strip("_") or "cache"


def default_max_length(model, v2: bool = False) -> int:
    """The model window minus generation headroom, like model2maxlen.json (4k -> 3500, 8k -> 7500)."""
    window = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                     "max_position_embeddings", None) or 4096
    n = max(500, (window - 500) // 500 * 500)
    return min(n, C.V2_DEFAULT_MAX_LENGTH) if v2 else n


def resolve_tasks(text: str, e: bool, v2: bool) -> list[str]:
    if v2:
        return [C.V2_TASK]
    universe = C.TASKS_E if e else C.TASKS_V1
    if text.strip().lower() == "all":
        return list(universe)
    tasks = []
    for t in (x.strip() for x in text.split(",")):
        if not t:
            continue
        t = base_task(t) if e else t
        if t not in universe:
            raise SystemExit(f"unknown {'LongBench-E ' if e else ''}task {t!r}; choose from: all, {', '.join(universe)}")
        if t not in tasks:
            tasks.append(t)
    if not tasks:
        raise SystemExit("--tasks is empty")
    return tasks


def _weighted_bpv(records: list[dict]) -> float | None:
    num = den = 0.0
    for r in records:
        b = r.get("bits_per_value")
        if b is None:
            continue
        w = (r.get("prompt_tokens") or 0) + (r.get("new_tokens") or 0) or 1
        num += b * w
        den += w
    return round(num / den, 4) if den else None


def run(args: argparse.Namespace, model=None, tokenizer=None) -> dict[str, Any]:
    """Generate what is missing, then score everything selected; returns the scores.json object."""
    from eval.common import (eos_ids, kv_dtype, load_model, model_label, parse_cache_list, progress, run_metadata,
                             set_seed, write_json, ResumableJsonl)

    if args.e and args.v2:
        raise SystemExit("--e and --v2 are different benchmarks; pick one")
    set_seed(args.seed)
    specs = parse_cache_list(args.caches)
    tasks = resolve_tasks(args.tasks, args.e, args.v2)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # data first, so a missing file fails before the model loads
    data: dict[str, list[dict]] = {}
    for task in tasks:
        samples = load_v2_data(args.data_dir) if args.v2 else load_task_data(task, args.data_dir, e=args.e)
        if args.limit is not None:
            samples = samples[:args.limit]
        data[task] = samples

    if model is None:
        model, tokenizer = load_model(args.model, args.gguf_file, args.device, args.dtype)
    max_length = args.max_length or default_max_length(model, v2=args.v2)
    stop = eos_ids(tokenizer, model)
    if not stop:
        raise SystemExit("the tokenizer/model defines no eos token; cannot stop generation")
    suffix = "_e" if args.e else ""

    # ---- generate
    for task in tasks:
        samples = data[task]
        ids = _sample_ids(samples, task)
        files = {s.name: ResumableJsonl(out_dir / "predictions" / cache_dirname(s.name) / f"{task}{suffix}.jsonl",
                                        key="_id") for s in specs}
        todo = [i for i, sid in enumerate(ids) if any(sid not in files[s.name] for s in specs)]
        if not todo:
            continue
        if args.v2:
            max_new, min_new, task_stop = C.V2_MAX_NEW_TOKENS, 0, stop
        else:
            max_new = C.DATASET2MAXLEN[task]
            newline = task in C.NEWLINE_STOP_TASKS
            min_new = 1 if newline else 0  # pred.py: min_length = context_length + 1
            task_stop = sorted(set(stop) | {newline_token_id(tokenizer)}) if newline else stop
        bar = progress(todo, desc=f"{task}{suffix}", unit="sample")
        for i in bar:
            sample, sid = samples[i], ids[i]
            if args.v2:
                prompt, truncated = truncate_middle_v2(tokenizer, build_prompt_v2(sample), max_length)
                input_ids = encode_prompt(tokenizer, prompt, use_chat=bool(args.chat and tokenizer.chat_template))
            else:
                prompt, truncated = truncate_middle(tokenizer, build_prompt(task, sample), max_length)
                input_ids = encode_prompt(tokenizer, prompt, use_chat=uses_chat_template(tokenizer, task, args.chat))
            for spec in specs:
                if sid in files[spec.name]:
                    continue
                text, info = generate_one(model, tokenizer, input_ids, max_new, spec, task_stop, min_new)
                rec: dict[str, Any] = {"_id": sid}
                if args.v2:
                    response = text.strip()
                    rec.update(response=response, pred=extract_answer_v2(response), answer=sample.get("answer"),
                               difficulty=sample.get("difficulty"), length=sample.get("length"),
                               domain=sample.get("domain"), sub_domain=sample.get("sub_domain"))
                    rec["judge"] = rec["pred"] == rec["answer"]
                else:
                    rec.update(pred=text, answers=sample["answers"], all_classes=sample.get("all_classes"),
                               length=sample.get("length"))
                rec.update(info, truncated=truncated)
                files[spec.name].append(rec)

    # ---- score (only the selected samples, so every cache is scored on the same set)
    result: dict[str, Any] = {"scores": {}, "averages": {}, "bits_per_value": {}, "n_samples": {},
                              "benchmark": "longbench_v2" if args.v2 else ("longbench_e" if args.e else "longbench"),
                              "caches": [s.name for s in specs], "tasks": tasks, "max_length": max_length,
                              "kv_dtype": kv_dtype(model)}
    if args.e:
        result["buckets"] = {}
    if args.v2:
        result["v2"] = {}
    for spec in specs:
        task_scores: dict[str, float] = {}
        all_records: list[dict] = []
        for task in tasks:
            wanted = _sample_ids(data[task], task)
            f = ResumableJsonl(out_dir / "predictions" / cache_dirname(spec.name) / f"{task}{suffix}.jsonl", key="_id")
            by_id = {r["_id"]: r for r in f}
            recs = [by_id[w] for w in wanted if w in by_id]
            if not recs:
                continue
            all_records += recs
            result["n_samples"].setdefault(spec.name, {})[task] = len(recs)
            if args.v2:
                v2 = score_v2(recs)
                result["v2"][spec.name] = v2
                task_scores[task] = v2["overall"]
                continue
            preds = [r["pred"] for r in recs]
            answers = [r["answers"] for r in recs]
            classes = [r.get("all_classes") for r in recs]
            task_scores[task] = scorer(task, preds, answers, classes)
            if args.e:
                result["buckets"].setdefault(spec.name, {})[task] = scorer_e(
                    task, preds, answers, [int(r.get("length") or 0) for r in recs], classes)
        result["scores"][spec.name] = task_scores
        if not args.v2:
            result["averages"][spec.name] = averages(task_scores)
        result["bits_per_value"][spec.name] = _weighted_bpv(all_records)
    result["model"] = model_label(args.model or "", args.gguf_file)
    result["meta"] = run_metadata(args)
    write_json(out_dir / "scores.json", result)
    (out_dir / "scores.md").write_text(render_markdown(result), encoding="utf-8")
    return result


# ============================================================================================= markdown

def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def render_markdown(result: dict[str, Any]) -> str:
    caches = result["caches"]
    scores = result["scores"]
    lines = [f"# {result['benchmark']}: {result.get('model', '')}", "",
             f"max_length {result['max_length']}; samples per task: "
             + ", ".join(f"{t} {max((result['n_samples'].get(c, {}).get(t, 0) for c in caches), default=0)}"
                         for t in result["tasks"]), ""]
    head = "| task | " + " | ".join(caches) + " |"
    sep = "|---|" + "---:|" * len(caches)
    lines += [head, sep]
    for t in result["tasks"]:
        lines.append(f"| {t} | " + " | ".join(_fmt(scores.get(c, {}).get(t)) for c in caches) + " |")
    if result.get("v2"):
        lines += ["", "## LongBench v2 accuracy (strict / compensated)", "",
                  "| split | " + " | ".join(caches) + " |", sep]
        for split in ("overall", "easy", "hard", "short", "medium", "long"):
            row = []
            for c in caches:
                v = result["v2"].get(c, {})
                row.append(f"{_fmt(v.get(split))} / {_fmt(v.get(split + '_compensated'))}")
            lines.append(f"| {split} | " + " | ".join(row) + " |")
    if result.get("averages"):
        lines += ["", "## Averages", "", "| average | " + " | ".join(caches) + " |", sep]
        avgs = result["averages"]
        keys: list[str] = []
        for c in caches:
            for k, v in avgs.get(c, {}).items():
                if not k.endswith("_missing") and not isinstance(v, dict) and k not in keys:
                    keys.append(k)
        for lang in ("en", "zh"):
            cats = C.CATEGORIES_EN if lang == "en" else C.CATEGORIES_ZH
            if any(f"categories_{lang}" in avgs.get(c, {}) for c in caches):
                for cat in cats:
                    lines.append(f"| {cat} ({lang}) | " + " | ".join(
                        _fmt(avgs.get(c, {}).get(f"categories_{lang}", {}).get(cat)) for c in caches) + " |")
        labels = {"avg_6cat_en": "LongBench avg, 6 categories (en)", "avg_6cat_zh": "LongBench avg, 6 categories (zh)",
                  "avg_16_en_code": "mean of 16 en+code tasks", "avg_15_kivi": "mean of 15 tasks (KIVI)",
                  "avg_8_kivi": "mean of 8 tasks (KIVI Tab. 4)", "avg_all_run": "mean of all tasks run"}
        for k in keys:
            partial = any(avgs.get(c, {}).get(k + "_missing") for c in caches)
            lines.append(f"| {labels.get(k, k)}{' (partial)' if partial else ''} | "
                         + " | ".join(_fmt(avgs.get(c, {}).get(k)) for c in caches) + " |")
    if result.get("buckets"):
        lines += ["", "## LongBench-E by length (0-4k / 4-8k / 8k+)", "", head, sep]
        for t in result["tasks"]:
            cells = []
            for c in caches:
                b = result["buckets"].get(c, {}).get(t, {})
                cells.append(" / ".join(_fmt(b.get(k)) for k in C.E_BUCKETS))
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    from eval.common import bits_header

    lines += ["", f"| {bits_header(result.get('kv_dtype'))} | "
              + " | ".join(_fmt(result["bits_per_value"].get(c)) for c in caches) + " |",
              "|---|" + "---:|" * len(caches), ""]
    lines.append("(partial) = not every task of the average was run; see scores.json `*_missing`.")
    return "\n".join(lines) + "\n"


# ============================================================================================= CLI

def build_parser() -> argparse.ArgumentParser:
    from eval.common import add_common_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--data-dir", default=None,
                   help="unzipped LongBench data (<dir>/<task>.jsonl, <task>_e.jsonl; v2: <dir>/data.json); "
                        "default: the hub (needs network)")
    p.add_argument("--tasks", default="all", help="comma list of tasks, or all (default)")
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt budget in tokens before the chat template (middle truncation); default: model "
                        "window - 500 rounded down to 500s (4k -> 3500, 8k -> 7500); v2 at most 120000")
    p.add_argument("--e", action="store_true", help="LongBench-E (<task>_e.jsonl, 13 tasks, length buckets)")
    p.add_argument("--v2", action="store_true", help="LongBench v2 (multiple choice, 0-shot prompt)")
    p.add_argument("--no-chat-template", dest="chat", action="store_false",
                   help="never apply the chat template (base models)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if not args.out:
        raise SystemExit("--out is required")
    result = run(args)
    print((Path(args.out) / "scores.md").read_text(encoding="utf-8"))
    return result


if __name__ == "__main__":
    main()
