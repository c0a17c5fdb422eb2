"""lm-eval model "hf-kvcomp" and launcher: offline, tiny random Llama, locally trained tokenizer, fixture tasks."""

import json
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "eval" / "lm_eval_tasks"

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

from eval import lm_eval_model as lem  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokenizer():
    """Byte-level BPE trained on the fixture task data (lossless for any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in (TASKS / "fixture_data.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        texts += [r["context"], r["question"], r["answer"], " ".join(r["choices"]), "Question: Answer:"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    d = tmp_path_factory.mktemp("lm_eval_tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    from eval.common import load_model

    return load_model(str(model_dir), None, "cpu", "float32", attn_implementation="kvcomp")


def test_registered():
    from lm_eval.api.registry import get_model

    assert get_model("hf-kvcomp") is lem.KVCompLM


@pytest.mark.parametrize("spec", ["full", "kvcomp"])
def test_loglikelihood_goes_through_the_cache_in_chunks(loaded, spec):
    """Chunked scoring through a cache: `full` reproduces the single cache-less pass; kvcomp is exact until the
    first block is compressed and close after that (the compressed past is read)."""
    model, tok = loaded
    lm = lem.KVCompLM(pretrained=model, tokenizer=tok, cache=spec, loglik_chunk=32, batch_size=1)
    torch.manual_seed(1)
    ids = torch.randint(3, len(tok), (1, 300))
    with torch.no_grad():
        ref = model(ids).logits
    got = lm._model_call(ids)
    assert got.shape == ref.shape
    assert lm.kv_stats["loglik_forward_passes"] == 10  # ceil(300 / 32)
    if spec == "full":
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert lm.bits_per_value == 32.0  # float32 model
    else:
        # the first block (64 tokens) is compressed once the cache holds residual 128 + 64 = 192 tokens, i.e. in
        # the chunk of tokens 160..191: the chunks before it (tokens < 160) read nothing compressed
        torch.testing.assert_close(got[:, :160], ref[:, :160], rtol=1e-4, atol=1e-4)
        rel = (got[:, 192:] - ref[:, 192:]).norm() / ref[:, 192:].norm()
        assert 0 < rel < 0.2
        assert lm.bits_per_value is not None


def test_middle_truncation(loaded):
    model, tok = loaded
    lm = lem.KVCompLM(pretrained=model, tokenizer=tok, cache="full", middle_truncation=True, batch_size=1)
    text = "Mara keeps the lighthouse on Gull Island. " * 6
    full = tok(text)["input_ids"]
    ids, mask = lm.tok_batch_encode([text, "grey"], left_truncate_len=11)
    # row 0: first 5 and last 6 tokens (head = 11 // 2); row 1 is short and left-padded to width 11
    assert ids[0].tolist() == full[:5] + full[-6:] and mask[0].all()
    short = tok("grey")["input_ids"]
    assert ids[1, -len(short):].tolist() == short and mask[1].sum() == len(short)
    plain = lem.KVCompLM(pretrained=model, tokenizer=tok, cache="full", batch_size=1)
    assert plain.tok_batch_encode([text], left_truncate_len=11)[0][0].tolist() == full[-11:]  # HFLM: left


def test_launcher_runs_fixture_tasks_offline_with_two_caches(model_dir, tmp_path, monkeypatch):
    """The launcher end to end: both fixture tasks, two caches, every generate/loglikelihood call with a fresh cache."""
    from eval import common

    made = []
    real = common.make_cache

    def counting(spec, model, **kwargs):
        cache = real(spec, model, **kwargs)
        made.append((common.parse_cache_spec(spec).name, cache))
        return cache

    monkeypatch.setattr(common, "make_cache", counting)
    out = tmp_path / "lm"
    summary = lem.main(["--model", str(model_dir), "--tasks", "kvcomp_fixture_gen,kvcomp_fixture_mc",
                        "--caches", "full,kvcomp", "--include-path", str(TASKS), "--out", str(out), "--limit", "2",
                        "--device", "cpu", "--metadata", '{"context_repeat": 12}', "--loglik-chunk", "64",
                        "--only-include-path"])
    res = json.loads((out / "results.json").read_text())
    assert res["caches"] == ["full", "kvcomp"]
    for cache in ("full", "kvcomp"):
        assert set(res["results"][cache]) == {"kvcomp_fixture_gen", "kvcomp_fixture_mc"}
        assert "acc,none" in res["results"][cache]["kvcomp_fixture_mc"]
        assert "exact_match,none" in res["results"][cache]["kvcomp_fixture_gen"]
        use = res["cache_use"][cache]
        assert use["generate_calls"] == 2  # one generate() per document, batch 1
        # 4 choices per document; lm-eval merges requests that share a context and a one-token continuation
        assert 2 <= use["loglik_calls"] <= 2 * 4 and use["loglik_forward_passes"] > use["loglik_calls"]
    # a fresh cache object per call (kvcomp); `full` makes None and uses a DynamicCache
    kv = [c for name, c in made if name == "kvcomp"]
    use = res["cache_use"]["kvcomp"]
    assert len(kv) == use["generate_calls"] + use["loglik_calls"] and len({id(c) for c in kv}) == len(kv)
    assert all(type(c).__name__ == "KVCompCache" for c in kv)
    # the repeated contexts are long enough (> 192 tokens) for compressed blocks: bits/value below fp32's 32
    assert res["bits_per_value"]["full"] == 32.0  # float32 model
    assert 0 < res["bits_per_value"]["kvcomp"] < 32
    assert "kvcomp_fixture_mc" in (out / "results.md").read_text()
    assert (out / "kvcomp" / "lm_eval_raw.json").is_file()
    assert summary["results"] == res["results"]


def test_stock_cli_with_registered_model(model_dir, tmp_path, monkeypatch):
    """`python -m eval.lm_eval_model lm-eval --model hf-kvcomp --model_args ...`: lm-eval loads the model itself."""
    out = tmp_path / "cli"
    monkeypatch.chdir(tmp_path)
    lem.main(["lm-eval", "--model", "hf-kvcomp", "--model_args",
              f"pretrained={model_dir},cache=kvcomp:rel_k=0.1;rel_v=0.2,dtype=float32", "--device", "cpu",
              "--tasks", "kvcomp_fixture_mc", "--include_path", str(TASKS), "--limit", "2",
              "--output_path", str(out)])
    files = list(out.rglob("results_*.json"))
    assert files, list(out.rglob("*"))
    res = json.loads(files[0].read_text())
    assert "kvcomp_fixture_mc" in res["results"]
