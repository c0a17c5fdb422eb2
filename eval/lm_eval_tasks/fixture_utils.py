"""Offline fixture tasks for lm-eval: the data is fixture_data.jsonl next to this file (hand-written).

metadata (--metadata / TaskManager(metadata=...)): context_repeat=N repeats each context N times, so the same
documents can be made long enough for the compressed part of a KV cache to matter.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

DATA = Path(__file__).resolve().parent / "fixture_data.jsonl"


def _rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(rows: list[dict]):
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def _context(row: dict, repeat: int) -> str:
    return " ".join([row["context"]] * max(1, int(repeat)))


def load_gen(context_repeat: int = 1, **_):
    rows = [{"context": _context(r, context_repeat), "question": r["question"], "answer": r["answer"]}
            for r in _rows()]
    return _dataset(rows)


def load_mc(context_repeat: int = 1, **_):
    rows = [{"context": _context(r, context_repeat), "question": r["question"], "choices": r["choices"],
             "label": r["choices"].index(r["answer"])} for r in _rows()]
    return _dataset(rows)


def _norm(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def process_gen(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: normalised prediction == normalised answer; contains: the answer occurs in the prediction."""
    pred = _norm(results[0])
    gold = _norm(doc["answer"])
    return {"exact_match": float(pred == gold), "contains": float(bool(gold) and gold in pred)}
