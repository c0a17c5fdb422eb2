"""Shared test helpers (importable as `helpers`: pytest puts tests/ on sys.path)."""

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    values.update(overrides)
    return LlamaConfig(**values)


class FakeAttention(torch.nn.Module):
    """What kvcomp's attention function reads of an attention module."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())
