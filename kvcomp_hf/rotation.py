"""Format stage 0: the randomised Hadamard rotation of K and V along head_dim (config.rotation).

Per-token quantisation spends its range on the largest channel of a token; K has a few outlier
channels, so most channels of a token use a small part of the range. An orthonormal rotation spreads
every outlier over all channels (QuaRot, RotateKV, vLLM's int4_per_token_head, llama.cpp's rotated
K cache do the same), and attention does not change: q·k = (qR)·(kR) and p·V = ((p·V R) Rᵀ).

With row vectors x [.., D] of one KV head h of one layer, K (kv=0) or V (kv=1):

    x_rot = (x ⊙ s) · H_D                 s = signs(seed, layer, kv)[h]  in {-1, +1}^D
    x     = (x_rot · H_Dᵀ) ⊙ s

H_D is the orthonormal Sylvester Hadamard matrix (entries ±1/sqrt(B)) of size B = the largest power
of two dividing D, repeated block-diagonally D / B times (B = D for head_dim 64, 128, 256).
The signs come from torch's CPU Mersenne-Twister generator seeded with
    seed * 1_000_003 + 2 * layer + kv
as 1 - 2 * torch.randint(0, 2, (H, D)) (one row per KV head), so a reader with the config and the
layer index rebuilds R exactly. Random signs matter: the plain Hadamard matrix keeps structured
inputs (e.g. a channel pattern repeated across tokens) structured.

The products are computed in float32 and rounded once to the cache dtype. On CUDA, 16-bit inputs (a decode
step's rows and a prefill's K and V alike) go through kernels/rotate.py (exact products, float32 sums in another
order: equal, or rarely one unit apart in the last place of the 16-bit result); float32 inputs and head sizes
the kernel does not tile through the float32 matrix product.

The cache holds everything of a rotated layer (compressed blocks and the uncompressed tail) in
rotated coordinates. Attention rotates q once with the K rotation of its KV head and un-rotates the
output once with the V rotation, per step, never per block.
"""

from __future__ import annotations

import torch

_SEED_STRIDE = 1_000_003


def hadamard_block_size(head_dim: int) -> int:
    """The largest power of two dividing head_dim (head_dim itself for 64, 128, 256)."""
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return head_dim & -head_dim


# The most rows (H * T) of one batch row that kernels/rotate.py takes: its launch grid's second dimension is at most
# 65,535 programs of up to 64 rows. (A decode step's few rows: cuBLAS runs such skinny float32 products in one or
# two thread blocks; a prefill's K and V: the float32 product makes five passes over float32 copies.)
KERNEL_MAX_ROWS = 65535 * 64


def kernel_rotates(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether kernels/rotate.py takes a CUDA tensor of this shape and dtype: [B, H, T, D] 16-bit, H * T <=
    KERNEL_MAX_ROWS, D a power of two in 16..256 (its tiles); anything else goes through the float32 product."""
    if len(shape) != 4 or dtype not in (torch.float16, torch.bfloat16):
        return False
    d = shape[3]
    return 16 <= d <= 256 and d & (d - 1) == 0 and shape[1] * shape[2] <= KERNEL_MAX_ROWS




def hadamard_matrix(head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal block-diagonal Sylvester Hadamard matrix [D, D] (symmetric)."""
    b = hadamard_block_size(head_dim)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / h.shape[0] ** 0.5
    return torch.block_diag(*([h] * (head_dim // b))).to(dtype)


def rotation_signs(seed: int, layer: int, kv: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """float32 [H, D] of ±1: the sign flips of layer `layer`, K (kv=0) or V (kv=1), one row per KV head."""
    gen = torch.Generator().manual_seed(seed * _SEED_STRIDE + 2 * layer + kv)
    return (1 - 2 * torch.randint(0, 2, (num_heads, head_dim), generator=gen)).to(torch.float32)


def layer_signs(seed: int, layer: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """float32 [2, H, D]: rotation_signs of layer `layer` for K and V."""
    return torch.stack([rotation_signs(seed, layer, kv, num_heads, head_dim) for kv in (0, 1)])


def hadamard_pm1(head_dim: int) -> torch.Tensor:
    """float32 [D, D] of ±1 (and 0 off the diagonal blocks): hadamard_matrix(head_dim) / its scale
    hadamard_block_size(head_dim) ** -0.5, the operand of the rotation kernels (exact in TF32)."""
    return (hadamard_matrix(head_dim) * hadamard_block_size(head_dim) ** 0.5).round()


class LayerRotation:
    """The rotations of one layer's K and V, applied to [B, H, T, D] tensors (float32 arithmetic)."""

    def __init__(self, seed: int, layer: int, num_heads: int, head_dim: int, device: torch.device,
                 kernel_on_cpu: bool = False, signs: torch.Tensor | None = None, h_pm1: torch.Tensor | None = None):
        """kernel_on_cpu: rotate CPU tensors through kernels/rotate.py too (Triton's interpreter), as the layers of
        the Triton backend do: their static append and combine kernels rotate with its products and sums.
        signs, h_pm1: tensors already holding layer_signs(seed, layer, ...) and hadamard_pm1(head_dim) on the
        device (the static cache's stacked ones), used instead of building them."""
        self.num_heads = num_heads
        self.kernel_on_cpu = kernel_on_cpu
        self.h = hadamard_matrix(head_dim).to(device)
        self.signs = layer_signs(seed, layer, num_heads, head_dim).to(device) if signs is None else signs  # [2, H, D]
        self._query_signs: dict[tuple[int, int], torch.Tensor] = {}  # (kv, query heads) -> expanded signs
        # the kernel's operands (kernels/rotate.py): H_D = scale * h_pm1, entries ±1 (exact in TF32)
        self.scale = hadamard_block_size(head_dim) ** -0.5
        self.h_pm1 = hadamard_pm1(head_dim).to(device) if h_pm1 is None else h_pm1

    def _signs_for(self, kv: int, heads: int) -> torch.Tensor:
        """[heads, 1, D]: a query/output head uses the rotation of its KV head (GQA: consecutive groups).
        The expansion for query heads is built once, not at every decode step."""
        if heads == self.num_heads:
            return self.signs[kv][:, None, :]
        if (kv, heads) not in self._query_signs:
            if heads % self.num_heads:
                raise ValueError(f"{heads} query heads do not share {self.num_heads} KV heads evenly")
            s = self.signs[kv].repeat_interleave(heads // self.num_heads, dim=0)
            self._query_signs[(kv, heads)] = s[:, None, :]
        return self._query_signs[(kv, heads)]

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        return (x.is_cuda or self.kernel_on_cpu) and kernel_rotates(tuple(x.shape), x.dtype)

    def rotate(self, x: torch.Tensor, kv: int) -> torch.Tensor:
        """x [B, H, T, D] (H = KV heads, or query heads sharing them) -> x_rot in x's dtype."""
        if self._kernel_takes(x):
            return self._kernel(x, kv, inverse=False)
        return ((x.float() * self._signs_for(kv, x.shape[1])) @ self.h).to(x.dtype)

    def unrotate(self, x: torch.Tensor, kv: int) -> torch.Tensor:
        """Inverse of rotate: x_rot [B, H, T, D] -> x in x_rot's dtype."""
        if self._kernel_takes(x):
            return self._kernel(x, kv, inverse=True)
        return ((x.float() @ self.h.T) * self._signs_for(kv, x.shape[1])).to(x.dtype)

    def _kernel(self, x: torch.Tensor, kv: int, inverse: bool) -> torch.Tensor:
        from kvcomp_hf.kernels.rotate import hadamard_rotate

        if x.shape[1] % self.num_heads:
            raise ValueError(f"{x.shape[1]} heads do not share {self.num_heads} KV heads evenly")
        return hadamard_rotate(x, self.signs[kv], self.h_pm1, self.scale, inverse)  # (H_D = H_Dᵀ)

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, H_q, T, D] -> q rotated like the keys it scores against (q_rot · k_rot = q · k)."""
        return self.rotate(q, 0)

    def unrotate_output(self, o: torch.Tensor) -> torch.Tensor:
        """o_rot = p · V_rot [B, H_q, T, D] -> o = o_rot · Rᵀ in original coordinates."""
        return self.unrotate(o, 1)
