"""GPU: generate() with the Triton path equals the PyTorch path of this project (SmolLM2-135M)."""

import pytest
import torch

import kvcomp_hf
from kvcomp_hf import cache_kwargs
from kvcomp_hf.demo import load_smollm2, offline_document, passkey_messages

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


SUMMARY_PROMPTS = [(2100, "Summarize the text above in about 80 words."),
                   (2400, "Explain in your own words what the text above is about."),
                   (2700, "List the main topics of the text above, one sentence each.")]


def _summary_inputs(tokenizer, n_tokens: int, question: str, seed: int):
    text = "\n\n".join(offline_document(tokenizer, n_tokens, seed))
    messages = [{"role": "user", "content": text + "\n\n" + question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).to("cuda")


def _teacher_forced_argmax(model, inputs, tokens, backend):
    """Greedy choice at every generated position, feeding the same tokens one at a time (decode path)."""
    cache = kvcomp_hf.KVCompCache(model.config, "smollm2-135m-instruct", backend=backend)
    picks, logits = [], []
    with torch.no_grad():
        out = model(**inputs, **cache_kwargs(cache))
        for t in range(tokens.numel()):
            logits.append(out.logits[0, -1].float())
            picks.append(int(logits[-1].argmax()))
            out = model(tokens[t:t + 1].view(1, 1), **cache_kwargs(cache))
    return torch.tensor(picks, device="cuda"), torch.stack(logits)


def _gap_in_bf16_steps(logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|logit of token a - logit of token b| per row of logits [n, vocab], in bf16 steps at the row's largest
    logit (2**-7 of it): at most 2 is a near-tie that float rounding may break either way."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return (logits[rows, a] - logits[rows, b]).abs() / (logits.abs().amax(-1) * 2.0 ** -7)


def test_triton_and_torch_paths_generate_the_same_tokens():
    """generate() with the PyTorch path on 3 prompts of 2,000+ tokens of real text, answers of natural length
    (up to 96 tokens); then, at every position of those answers, the greedy token of each path given the same
    prefix (teacher-forced, one token per step through the decode path). At least 95% of positions must
    agree, and where they do not, the two candidates' logits must be within 2 bf16 steps: a tie that float
    rounding breaks either way.

    Free-running agreement (each path continuing its own text) is printed, not asserted: SmolLM2's logits
    are bf16, exact ties occur (gap 0 measured), and after the first tie broken differently the two texts
    are different prefixes, so their later positions measure the text, not the kernels."""
    model, tokenizer = load_smollm2("cuda")
    agree = total = free_agree = 0
    for seed, (n_tokens, question) in enumerate(SUMMARY_PROMPTS):
        inputs = _summary_inputs(tokenizer, n_tokens, question, seed)
        n = inputs["input_ids"].shape[1]
        assert n >= 2000
        outs = {}
        for backend in ("triton", "torch"):
            cache = kvcomp_hf.KVCompCache(model.config, "smollm2-135m-instruct", backend=backend)
            outs[backend] = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=96, do_sample=False)[0, n:]
            assert cache.layers[0].use_triton == (backend == "triton")
        reference = outs["torch"]
        picks = {be: _teacher_forced_argmax(model, inputs, reference, be) for be in ("triton", "torch")}
        assert (picks["torch"][0] == reference).float().mean() >= 0.95  # the loop reproduces generate()
        differ = (picks["triton"][0] != picks["torch"][0]).nonzero().flatten().tolist()
        agree, total = agree + reference.numel() - len(differ), total + reference.numel()
        gaps = _gap_in_bf16_steps(picks["torch"][1][differ], picks["torch"][0][differ], picks["triton"][0][differ])
        for pos, gap in zip(differ, gaps.tolist()):
            print(f"  position {pos}: greedy tokens differ, logit gap {gap:.2f} bf16 steps")
        assert bool((gaps <= 2).all())
        a, b = outs["triton"], reference
        m = min(a.numel(), b.numel())
        common = m if torch.equal(a[:m], b[:m]) else int((a[:m] != b[:m]).nonzero()[0])
        free_agree += common
        print(f"prompt {seed}: {n} tokens, {b.numel()} generated; same greedy token at {1 - len(differ) / b.numel():.3f} "
              f"of positions; free-running texts identical for the first {common} tokens")
    print(f"greedy-token agreement Triton vs PyTorch path (same prefixes): {agree}/{total} = {agree / total:.4f}; "
          f"free-running identical prefix {free_agree}/{total} tokens")
    assert agree / total >= 0.95


def test_fused_attention_matches_dense_path_inside_a_model():
    """One decode step of SmolLM2's layers: the fused kernel against dense attention on the same cache."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, tokenizer = load_smollm2("cuda")
    inputs = tokenizer.apply_chat_template(passkey_messages(tokenizer, 3000, 12345), add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to("cuda")
    cache = kvcomp_hf.KVCompCache(model.config, "smollm2-135m-instruct")
    with torch.no_grad():
        model(**inputs, **cache_kwargs(cache))
    torch.manual_seed(0)
    for layer, attn in zip(cache.layers, model.model.layers):
        q = torch.randn(1, model.config.num_attention_heads, 1, 64, device="cuda", dtype=torch.bfloat16)
        got = layer.attend_fused(q, None, attn.self_attn.scaling)
        k, v = layer.dense_kv()
        want, _ = sdpa_attention_forward(attn.self_attn, q.float(), k.float(), v.float(), None,
                                         scaling=attn.self_attn.scaling)
        err = float((got.float() - want).norm() / want.norm())
        assert err < 1e-2, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiny_model_on_cuda_backends_agree(dtype):
    """Cache wiring on CUDA: Triton store + fused decode vs the PyTorch path, teacher-forced over the
    same tokens (a random model's greedy text is chaotic, so logits are compared, not free runs),
    with left padding; then beam search runs and keeps the cache's length."""
    from helpers import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(head_dim=32, hidden_size=128, num_attention_heads=4)).to(
        "cuda", dtype).eval()
    model.set_attn_implementation("kvcomp")
    ids = torch.randint(3, 256, (3, 400), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :57] = 0
    mask[2, :201] = 0
    steps = torch.randint(3, 256, (3, 150), device="cuda")
    cfg = {"rel_k": 1e-3, "rel_v": 1e-3}
    logits = {}
    for backend in ("triton", "torch"):
        cache = kvcomp_hf.KVCompCache(model.config, cfg, backend=backend)
        m = mask.clone()
        out = []
        with torch.no_grad():
            out.append(model(ids, attention_mask=m, **cache_kwargs(cache)).logits[:, -1])
            for t in range(steps.shape[1]):
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                out.append(model(steps[:, t:t + 1], attention_mask=m, **cache_kwargs(cache)).logits[:, -1])
        assert cache.layers[0].use_triton == (backend == "triton")
        logits[backend] = torch.stack(out).float()
    err = (logits["triton"] - logits["torch"]).norm(dim=-1) / logits["torch"].norm(dim=-1)
    print(dtype, "max per-step relative logit error", float(err.max()))
    assert float(err.max()) < 2e-2
    for backend in ("triton", "torch"):
        cache = kvcomp_hf.KVCompCache(model.config, cfg, backend=backend)
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=80, min_new_tokens=80,
                             num_beams=3, do_sample=False)
        assert cache.get_seq_length() == out.shape[1] - 1


class _ForceTokens:
    """A logits processor that makes generate() pick the given tokens (generate's raw logits stay as computed)."""

    def __init__(self, tokens: torch.Tensor, prompt_len: int):
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.prompt_len]] = 0
        return forced


def test_compiled_static_cache_generates_the_eager_tokens():
    """generate() with the static cache (transformers compiles the decode step; CUDA graphs) against the eager
    KVCompCache of the same format, on 2 prompts of 2,000+ tokens of real text, 64 new tokens each (a block is
    compressed inside the compiled steps). The compiled run is forced along the eager run's tokens, so every step
    compares the two at the same prefix: the greedy token is the same, except where the eager logits of the two
    candidates are within 2 bf16 steps (a near-tie that inductor's differently rounded model ops may break the other
    way). The logits' relative error is printed, not bounded: H100, 2026-12-06: up to 6.3e-2 (no reference yet for
    how far compiling the bf16 model alone moves them)."""
    model, tokenizer = load_smollm2("cuda")
    cfg = {"layout": "fixed", "rel_k": 1 / 15, "rel_v": 1 / 7, "sink_tokens": 0}  # the static cache keeps no sinks
    for seed, (n_tokens, question) in enumerate(SUMMARY_PROMPTS[:2]):
        inputs = _summary_inputs(tokenizer, n_tokens, question, seed)
        n = inputs["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
        eager = model.generate(**inputs, **cache_kwargs(kvcomp_hf.KVCompCache(model.config, cfg)), **kwargs)
        tokens = eager.sequences[0, n:]
        compiled = model.generate(**inputs, cache_implementation="kvcomp", cache_config={**cfg, "static": True},
                                  logits_processor=[_ForceTokens(tokens, n)], **kwargs)
        assert hasattr(model, "_compiled_call")
        assert torch.equal(compiled.sequences[0, n:], tokens)
        ref, got = torch.stack(eager.logits)[:, 0].float(), torch.stack(compiled.logits)[:, 0].float()
        err = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
        picks = got.argmax(-1)
        differ = (picks != tokens).nonzero()[:, 0]
        gaps = _gap_in_bf16_steps(ref[differ], tokens[differ], picks[differ])
        print(f"prompt {seed}: max per-step relative logit error {float(err.max()):.2e}; greedy tokens differ at "
              f"{differ.tolist()} (eager gaps {[round(g, 2) for g in gaps.tolist()]} bf16 steps)")
        assert bool((gaps <= 2).all())
