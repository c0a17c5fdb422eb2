"""eval/synthetic.py: deterministic generators, lengths, references, scoring, and the CLI on a tiny model."""

import json
import re
from collections import Counter

import pytest

from eval import common, synthetic
from eval.synthetic import SyntheticSuite, score_sample, string_match_all, string_match_part



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return common.build_tiny_model(tmp_path_factory.mktemp("tiny_synth"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def suite(tokenizer):
    return SyntheticSuite(tokenizer, text_source="pydoc", seed=7)


def test_scoring_hand_made_cases():
    assert string_match_all("The pass key is 12345.", ["12345"]) == 1.0
    assert string_match_all("numbers: 111, 333", ["111", "222", "333", "444"]) == 0.5
    assert string_match_all("nothing here", ["x1"]) == 0.0
    assert string_match_all("ABCDE fghij", ["abcde", "FGHIJ"]) == 1.0  # case-insensitive
    assert string_match_all("a\x00b", ["a\nb"]) == 1.0                # control characters become newlines
    assert string_match_all("", []) == 0.0
    assert string_match_part("foo bar", ["baz", "bar"]) == 1.0
    assert score_sample("niah_multivalue", "1 and 2", ["1", "2", "3", "4"]) == 50.0


def test_sentence_splitter_drops_needle_like_text():
    sents = synthetic.split_sentences("This is one sentence here. The pass key is 12345 here. "
                                      "One of the special magic numbers for x is 5. Another fine sentence follows.")
    assert sents == ["This is one sentence here.", "Another fine sentence follows."]


def test_insert_at_depths():
    s = [f"s{i}." for i in range(10)]
    out = synthetic.insert_at_depths(s, ["N0", "N1"], [0.0, 1.0])
    assert out[0] == "N0" and out[-1] == "N1" and len(out) == 12


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_generators_deterministic_and_sized(suite, tokenizer, task):
    a = suite.sample(task, 768, 3)
    b = suite.sample(task, 768, 3)
    c = suite.sample(task, 768, 4)
    assert a == b
    assert a.prompt != c.prompt
    other = SyntheticSuite(tokenizer, text_source="pydoc", seed=8).sample(task, 768, 3)
    assert other.prompt != a.prompt
    n = len(suite.prompt_ids(a.prompt, a.answer_prefix))
    assert n == a.meta["prompt_tokens"]
    assert n + a.max_new_tokens <= 768
    # whole sentences of pydoc text are long in the tiny 512-word tokenizer: the fill is coarse at this length
    assert n >= 0.75 * (768 - a.max_new_tokens)
    assert a.references and all(isinstance(r, str) and r for r in a.references)


def test_references_are_in_the_text(suite):
    s = suite.sample("passkey", 768, 0)
    assert s.prompt.count(s.references[0]) == 2
    s = suite.sample("niah_single", 768, 0)
    assert f"One of the special magic numbers for {s.meta['query']} is: {s.references[0]}." in s.prompt
    s = suite.sample("niah_multikey", 768, 0)
    assert s.prompt.count("One of the special magic numbers for") == 4
    assert f"for {s.meta['query']} is: {s.references[0]}." in s.prompt
    s = suite.sample("niah_multivalue", 768, 0)
    for v in s.references:
        assert f"for {s.meta['query']} is: {v}." in s.prompt
    s = suite.sample("vt", 768, 0)
    names = s.references
    assert f"VAR {names[0]} = {s.meta['value']}." in s.prompt
    for prev, cur in zip(names, names[1:]):
        assert f"VAR {cur} = VAR {prev}." in s.prompt
    assert s.prompt.index(f"VAR {names[0]} =") < s.prompt.index(f"VAR {names[-1]} =")


def test_cwe_and_fwe_answers_are_the_most_frequent(suite):
    s = suite.sample("cwe", 1024, 1)
    listing = s.prompt.split("\n")[1]
    counts = Counter(re.findall(r"\d+\. (\S+)", listing))
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(s.references)
    assert min(counts[w] for w in s.references) > max(c for w, c in counts.items() if w not in s.references)
    s = suite.sample("fwe", 1024, 1)
    text = s.prompt.split("\n")[1]
    counts = Counter(w for w in text.split() if w != "....")
    ranked = counts.most_common()
    assert [w for w, _ in ranked[:3]] == s.references
    assert ranked[2][1] > ranked[3][1]


def test_aggregate_and_markdown():
    recs = [{"cache": "full", "task": "passkey", "length": 512, "score": 100.0, "bits_per_value": 16.0},
            {"cache": "full", "task": "passkey", "length": 512, "score": 0.0, "bits_per_value": 16.0},
            {"cache": "full", "task": "vt", "length": 512, "score": 60.0, "bits_per_value": 16.0}]
    agg = synthetic.aggregate(recs, ["full"], ["passkey", "vt"], [512])
    assert agg["scores"]["full"]["512"] == {"passkey": 50.0, "vt": 60.0, "avg": 55.0}
    assert agg["bits_per_value"]["full"]["512"] == 16.0
    assert "| full | 16.0 | 50.0 | 60.0 | 55.0 |" in synthetic.markdown_table(agg, ["full"], ["passkey", "vt"], [512])


def test_cli_end_to_end_and_resume(tiny_dir, tmp_path):
    out = tmp_path / "synth"
    argv = ["--model", str(tiny_dir), "--caches", "full,kivi2", "--lengths", "384", "--samples", "1",
            "--tasks", "passkey,vt", "--text", "pydoc", "--out", str(out), "--device", "cpu"]
    synthetic.main(argv)
    res = json.loads((out / "scores.json").read_text())
    assert set(res["scores"]) == {"full", "kivi2"}
    assert set(res["scores"]["full"]["384"]) == {"passkey", "vt", "avg"}
    assert res["bits_per_value"]["full"]["384"] == 32.0 and res["bits_per_value"]["kivi2"]["384"] < 32
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert (out / "scores.md").is_file()
    synthetic.main(argv)  # resume: nothing recomputed
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
