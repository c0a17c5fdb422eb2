"""GPU: generate() with the Triton path equals the PyTorch path of this project (SmolLM2-135M)."""

import pytest
import torch

import kvcomp_hf
from kvcomp_hf.demo import load_smollm2, passkey_messages

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def test_triton_and_torch_paths_generate_the_same_tokens():
    model, tokenizer = load_smollm2("cuda")
    agree, total = 0, 0
    for seed, key in enumerate((40213, 77715, 51908)):
        inputs = tokenizer.apply_chat_template(passkey_messages(tokenizer, 2100 + 300 * seed, key, seed=seed),
                                               add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to("cuda")
        n = inputs["input_ids"].shape[1]
        assert n >= 2000
        outs = {}
        for backend in ("triton", "torch"):
            cache = kvcomp_hf.KVCompCache(model.config, "smollm2-135m-instruct", backend=backend)
            outs[backend] = model.generate(**inputs, past_key_values=cache, max_new_tokens=64, min_new_tokens=64,
                                           do_sample=False)[0, n:]
            assert cache.layers[0].use_triton == (backend == "triton")
        agree += int((outs["triton"] == outs["torch"]).sum())
        total += outs["torch"].numel()
        print(f"prompt {seed}: {n} tokens, agreement {(outs['triton'] == outs['torch']).float().mean():.3f}")
    print(f"greedy-token agreement Triton vs PyTorch path: {agree}/{total} = {agree / total:.4f}")
    assert agree / total >= 0.95


def test_fused_attention_matches_dense_path_inside_a_model():
    """One decode step of SmolLM2's layers: the fused kernel against dense attention on the same cache."""
    from kvcomp_hf.attention import fused_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, tokenizer = load_smollm2("cuda")
    inputs = tokenizer.apply_chat_template(passkey_messages(tokenizer, 3000, 12345), add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to("cuda")
    cache = kvcomp_hf.KVCompCache(model.config, "smollm2-135m-instruct")
    with torch.no_grad():
        model(**inputs, past_key_values=cache)
    torch.manual_seed(0)
    for layer, attn in zip(cache.layers, model.model.layers):
        q = torch.randn(1, model.config.num_attention_heads, 1, 64, device="cuda", dtype=torch.bfloat16)
        got = fused_attention(layer, q, None, attn.self_attn.scaling)
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
            out.append(model(ids, attention_mask=m, past_key_values=cache).logits[:, -1])
            for t in range(steps.shape[1]):
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                out.append(model(steps[:, t:t + 1], attention_mask=m, past_key_values=cache).logits[:, -1])
        assert cache.layers[0].use_triton == (backend == "triton")
        logits[backend] = torch.stack(out).float()
    err = (logits["triton"] - logits["torch"]).norm(dim=-1) / logits["torch"].norm(dim=-1)
    print(dtype, "max per-step relative logit error", float(err.max()))
    assert float(err.max()) < 2e-2
    for backend in ("triton", "torch"):
        cache = kvcomp_hf.KVCompCache(model.config, cfg, backend=backend)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=80, min_new_tokens=80,
                             num_beams=3, do_sample=False)
        assert cache.get_seq_length() == out.shape[1] - 1
