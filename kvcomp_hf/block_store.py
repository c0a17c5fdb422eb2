"""BlockStore: the compressed storage of one layer, the one type the codec and both kernels read.

A store holds immutable compressed 64-token blocks in *slots*: a byte pool of segments (codec.py's format),
its device-side byte counter `pool_used`, and per-slot arrays seg_offset/seg_bytes [S, 2, H], token_min/
token_step [S, 2, 64, G] and perm [S, 64] (one shared identity row for repack "none"). Its format is the
BlockFormat plus rel_k/rel_v (the quantiser's step; bits follow from them) and the rotation setting (with
"hadamard" the blocks hold rotated K/V; readers rotate q and the output, see codec.py stage 0).

Writers: BlockStore.add (the reference codec, or kernels.store_blocks on the GPU), and the static cache's
store kernel at fixed offsets. Readers: codec.decode_store (dequantise slots), kernels.decode_attention
(fused attention over a block table). No transformers import here: the kernels depend on this module.
"""

from __future__ import annotations

import contextlib

import torch

from . import codec
from .codec import BLOCK_SIZE, BlockFormat
from .config import KVCompConfig

POOL_HEADROOM = 0.125  # byte pools grow (and are fitted) with 12.5% to spare
FIT_POOL_AFTER_BYTES = 8 << 20  # stores that may reserve more than this are followed by fit_pool()

# Stores whose prefill-sized add left a worst-case reservation, fitted by fit_pending_pools (see BlockStore.add).
_unfitted: list[BlockStore] = []


def device_context(device: torch.device):
    """Triton launches on the current CUDA device (device_map="auto"); on the CPU the interpreter runs them."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class BlockStore:
    """Immutable compressed blocks of one layer: byte pool + per-block (slot) metadata + the format.

    On CUDA the Triton store kernel appends segments at `pool_used` (a device counter), so no
    step waits for the GPU: the host keeps an upper bound of the bytes used (`used_bound`) and reads the
    exact counter only when that bound says the pool may have to grow (its slack is used up) and after
    prefill-sized stores (fit_pool); other steps never wait for the GPU."""

    def __init__(self, fmt: BlockFormat, dtype: torch.dtype, device: torch.device, rel_k: float, rel_v: float,
                 rotation: str = "none", use_triton: bool = False):
        if (codec.bits_for_rel(rel_k), codec.bits_for_rel(rel_v)) != (fmt.bits_k, fmt.bits_v):
            raise ValueError(f"rel_k={rel_k}, rel_v={rel_v} do not give the format's bits "
                             f"({fmt.bits_k}, {fmt.bits_v})")
        self.fmt = fmt
        self.rel_k, self.rel_v = float(rel_k), float(rel_v)
        self.rotation = rotation
        self.dtype = dtype
        self.device = torch.device(device)
        self.use_triton = use_triton
        h, g = fmt.num_heads, fmt.groups
        self.pool = torch.zeros(0, dtype=torch.uint8, device=device)
        self.pool_used = torch.zeros(1, dtype=torch.int64, device=device)  # exact bytes in use
        self.used_bound = 0  # host-side upper bound of pool_used
        self.used_is_exact = True  # used_bound == pool_used (no Triton store since the host last learnt it)
        self.n_slots = 0
        self.seg_offset = torch.zeros(0, 2, h, dtype=torch.int64, device=device)
        self.seg_bytes = torch.zeros(0, 2, h, dtype=torch.int32, device=device)
        self.token_min = torch.zeros(0, 2, BLOCK_SIZE, g, dtype=dtype, device=device)
        self.token_step = torch.zeros(0, 2, BLOCK_SIZE, g, dtype=torch.bfloat16, device=device)
        # repack "none" stores no permutation: every block shares one identity row
        self.has_perm = fmt.repack != "none"
        rows = 0 if self.has_perm else 1
        self.perm = torch.arange(BLOCK_SIZE, device=device).to(torch.uint8).repeat(rows, 1)

    @classmethod
    def from_config(cls, config: KVCompConfig, num_heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device, use_triton: bool = False) -> BlockStore:
        return cls(BlockFormat.from_config(config, num_heads, head_dim), dtype, device, config.rel_k, config.rel_v,
                   config.rotation, use_triton)

    @staticmethod
    def _grown(t: torch.Tensor, needed: int, factor: float = 2.0) -> torch.Tensor:
        if t.shape[0] >= needed:
            return t
        size = max(needed, int(factor * t.shape[0]))
        out = torch.zeros((size,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        out[: t.shape[0]] = t
        return out

    def fit_pool(self, headroom: float = POOL_HEADROOM, used: int | None = None) -> None:
        """Shrink the byte pool to the bytes in use plus headroom (one host sync, unless the caller knows
        `used`, the exact bytes in use). The Triton store reserves the worst case of every store; after a
        prefill-sized store that reservation can be much larger than what compression produced."""
        if used is None:
            used = self.used_bytes()
        else:
            self.used_bound, self.used_is_exact = used, True
        target = (int(used * (1 + headroom)) + 4095) // 4096 * 4096
        if self.pool.numel() > target * (1 + headroom):
            pool = torch.zeros(target, dtype=torch.uint8, device=self.device)
            pool[:used] = self.pool[:used]
            self.pool = pool

    def compact(self, block_table: torch.Tensor) -> torch.Tensor:
        """Drop the blocks that block_table does not reference and move the others to the front of the
        pool (in slot order, so every segment moves towards the start); returns block_table renumbered.
        Two host syncs (how many slots and bytes are kept) and one copy of the kept bytes: call it rarely
        (KVCompLayer._maybe_compact decides when)."""
        live = torch.zeros(self.n_slots, dtype=torch.bool, device=self.device)
        live[block_table.reshape(-1).long()] = True
        keep = live.nonzero().squeeze(1)
        n_keep = keep.numel()
        if n_keep == self.n_slots:
            return block_table
        renumber = torch.zeros(self.n_slots, dtype=torch.int32, device=self.device)
        renumber[keep] = torch.arange(n_keep, dtype=torch.int32, device=self.device)
        size = self.seg_bytes[keep].reshape(-1).long()
        old_offset = self.seg_offset[keep].reshape(-1)
        new_offset = size.cumsum(0) - size
        used = int(size.sum()) if n_keep else 0
        pool = torch.zeros((int(used * (1 + POOL_HEADROOM)) + 4095) // 4096 * 4096 if used else 0,
                           dtype=torch.uint8, device=self.device)
        if used:
            _move_segments(self.pool, old_offset, pool, new_offset, size,
                           max(self.fmt.max_segment_bytes(0), self.fmt.max_segment_bytes(1)))
        self.pool = pool
        self.pool_used.fill_(used)
        self.used_bound, self.used_is_exact = used, True
        self.seg_offset = new_offset.view(n_keep, *self.seg_offset.shape[1:])
        for name in ("seg_bytes", "token_min", "token_step") + (("perm",) if self.has_perm else ()):
            setattr(self, name, getattr(self, name)[keep])
        self.n_slots = n_keep
        return renumber[block_table.long()]

    def allocated_bytes(self) -> dict[str, int]:
        """Bytes the store's tensors occupy, spare capacity included: the byte pool and the per-slot arrays."""
        meta = sum(t.numel() * t.element_size() for t in (self.seg_offset, self.seg_bytes, self.token_min,
                                                           self.token_step, self.perm, self.pool_used))
        return {"pool": self.pool.numel(), "slot_metadata": meta}

    def used_bytes(self) -> int:
        """Exact pool bytes in use (a host sync on CUDA; not for the hot path). Also resets used_bound to it,
        which callers that append with kernels.store_blocks directly (not through add) rely on."""
        self.used_bound = int(self.pool_used.item())
        self.used_is_exact = True
        return self.used_bound

    def reserve(self, n_blocks: int, max_bytes: int) -> tuple[int, int]:
        """Room for n_blocks more slots and max_bytes more pool bytes; returns the slot range."""
        if self.used_bound + max_bytes > self.pool.numel():
            if not self.used_is_exact:  # the exact count may be lower: worth a sync before growing
                self.used_bytes()
            if self.used_bound + max_bytes > self.pool.numel():
                self.pool = self._grown(self.pool, self.used_bound + max_bytes, factor=1 + POOL_HEADROOM)
        s0, s1 = self.n_slots, self.n_slots + n_blocks
        for name in ("seg_offset", "seg_bytes", "token_min", "token_step") + (("perm",) if self.has_perm else ()):
            setattr(self, name, self._grown(getattr(self, name), s1))
        self.n_slots = s1
        return s0, s1

    def fixed_slot_bytes(self) -> int:
        """Bytes of one slot in layout "fixed": K and V segments of every head at their (only) size."""
        return self.fmt.num_heads * (self.fmt.max_segment_bytes(0) + self.fmt.max_segment_bytes(1))

    def preallocate_fixed(self, n_slots: int, layers: int = 1) -> dict[str, torch.Tensor]:
        """Layout "fixed" (the static cache): n_slots slots at fixed offsets, every segment at its (only) size;
        segment (slot, kv, head) at slot * slot_bytes + kv * H * seg[0] + head * seg[kv] (kernels/static_cache.py).
        The pool, token_min and token_step are allocated for `layers` stores of this format at once and this store
        takes the first; returns them all ({"pool": [layers, n_slots * slot_bytes], "token_min", "token_step"}), for
        the other stores' use_slots. The pool counts as full (its writers place segments by slot, not by
        pool_used)."""
        if self.fmt.layout != "fixed" or self.has_perm:
            raise ValueError(f"preallocated slots need layout='fixed' and repack='none', got {self.fmt}")
        h, device = self.fmt.num_heads, self.device
        seg = torch.tensor([self.fmt.max_segment_bytes(0), self.fmt.max_segment_bytes(1)])
        slot_bytes = self.fixed_slot_bytes()
        stacked = {"pool": torch.zeros(layers, n_slots * slot_bytes, dtype=torch.uint8, device=device),
                   "token_min": torch.zeros(layers, n_slots, 2, BLOCK_SIZE, self.fmt.groups, dtype=self.dtype,
                                            device=device),
                   "token_step": torch.zeros(layers, n_slots, 2, BLOCK_SIZE, self.fmt.groups, dtype=torch.bfloat16,
                                             device=device),
                   "seg_offset": (torch.arange(n_slots)[:, None, None] * slot_bytes
                                  + torch.tensor([0, h * int(seg[0])])[None, :, None]
                                  + torch.arange(h)[None, None, :] * seg[None, :, None]).to(device),
                   "seg_bytes": seg.to(torch.int32).view(1, 2, 1).expand(n_slots, 2, h).contiguous().to(device)}
        self.use_slots(stacked, 0)
        return stacked

    def use_slots(self, stacked: dict[str, torch.Tensor], index: int) -> None:
        """Take store `index` of preallocate_fixed's tensors (seg_offset and seg_bytes are equal in every store:
        shared, and rewritten with the same values by each store's writes)."""
        self.pool = stacked["pool"][index]
        self.token_min = stacked["token_min"][index]
        self.token_step = stacked["token_step"][index]
        self.seg_offset, self.seg_bytes = stacked["seg_offset"], stacked["seg_bytes"]
        self.used_bound = self.pool.numel()
        self.n_slots = stacked["seg_offset"].shape[0]

    def perm_of(self, n_slots: int) -> torch.Tensor:
        """Permutation rows of n_slots slots (for "none": the shared identity row, stride 0; the store
        kernel then rewrites that row with the identity and the decode kernel does not read it)."""
        return self.perm if self.has_perm else self.perm.expand(n_slots, BLOCK_SIZE)

    def max_bytes(self, n_blocks: int) -> int:
        """The most pool bytes n_blocks blocks can take (every segment at its largest)."""
        return n_blocks * self.fmt.num_heads * (self.fmt.max_segment_bytes(0) + self.fmt.max_segment_bytes(1))

    def add(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Compress k, v [B, H, nb*64, D]; returns the new blocks' slot ids as int32 [B, nb]."""
        b, h, t, d = k.shape
        nb = t // BLOCK_SIZE
        if self in _unfitted:  # its pending fit reads pool_used as of its last store: fit before appending
            fit_pending_pools()
        if self.use_triton:
            from kvcomp_hf.kernels import store_blocks

            max_bytes = self.max_bytes(b * nb)
            s0, s1 = self.reserve(b * nb, max_bytes)
            with device_context(self.device):
                store_blocks(k, v, self, s0)
            self.used_bound += max_bytes
            self.used_is_exact = False
            if max_bytes >= FIT_POOL_AFTER_BYTES:  # a prefill-sized store: give back its worst-case reservation,
                self._fit_later()                  # without a host sync (fit_pending_pools)
        else:
            def blocks(x):  # [B, H, nb*64, D] -> [B*nb, H, 64, D], block index = b * nb + i
                return x.reshape(b, h, nb, BLOCK_SIZE, d).permute(0, 2, 1, 3, 4).reshape(b * nb, h, BLOCK_SIZE, d)

            enc = codec.encode_with_format(blocks(k), blocks(v), self.fmt, self.rel_k, self.rel_v)
            nbytes = enc.data.numel()
            s0, s1 = self.reserve(b * nb, nbytes)
            used = self.used_bound
            self.pool[used: used + nbytes] = enc.data
            self.seg_offset[s0:s1] = enc.seg_offset + used
            self.seg_bytes[s0:s1] = enc.seg_bytes.to(torch.int32)
            self.token_min[s0:s1] = enc.token_min
            self.token_step[s0:s1] = enc.token_step
            if self.has_perm:
                self.perm[s0:s1] = enc.perm
            self.used_bound += nbytes
            self.pool_used += nbytes
        return torch.arange(s0, s1, dtype=torch.int32, device=self.device).view(b, nb)

    def _fit_later(self) -> None:
        """Copy pool_used to the host behind the store, asynchronously, and queue the store for
        fit_pending_pools. (fit_pool's .item() right away would wait for the whole queue at every layer of a
        prefill, so the GPU would idle while the host prepares the next layer: ~0.1 s of a 32K-token Llama-8B
        prefill on the H200.)"""
        if self.device.type != "cuda":
            self.fit_pool()
            return
        if self not in _unfitted:
            if getattr(self, "_used_on_host", None) is None:
                self._used_on_host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
                self._used_known = torch.cuda.Event()
            _unfitted.append(self)
        self._used_on_host.copy_(self.pool_used, non_blocking=True)
        self._used_known.record(torch.cuda.current_stream(self.device))

    def decode(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantise blocks (any shape of slot ids) -> float32 K, V [*slots.shape, H, 64, D] in arrival order."""
        return codec.decode_store(self, slots)

    def bytes_of(self, slots: torch.Tensor) -> dict[str, dict[str, int]]:
        """Bytes held for the given unique slots, split by kind, for K and V."""
        fmt = self.fmt
        n = slots.numel()
        seg = self.seg_bytes[slots.long()]
        meta = codec.metadata_bytes_per_block(fmt, self.dtype)
        out = {}
        for kv, name in ((0, "k"), (1, "v")):
            parts = codec.segment_breakdown(seg[:, kv], fmt, kv)
            parts.update({key: value * n for key, value in meta.items()})
            out[name] = parts
        out["shared"] = {"perm": BLOCK_SIZE * n if self.has_perm else 0}
        return out


def fit_pending_pools() -> None:
    """Fit the pools that prefill-sized stores left at their worst case (BlockStore._fit_later), each after
    waiting only until the GPU has passed that store, not for the work queued behind it. Called when the next
    layer updates, so at most two layers hold a worst-case reservation and the GPU never runs dry."""
    while _unfitted:
        store = _unfitted.pop(0)
        store._used_known.synchronize()
        store.fit_pool(used=int(store._used_on_host[0]))


def _move_segments(src: torch.Tensor, src_offset: torch.Tensor, dst: torch.Tensor, dst_offset: torch.Tensor,
                   size: torch.Tensor, max_size: int, chunk_bytes: int = 1 << 24) -> None:
    """Copy segments of `size` bytes from src_offset in src to dst_offset in dst, without a host sync:
    each segment is read through a window of max_size bytes; bytes past its size go to dst's last byte,
    which lies past the copied bytes (the caller allocates headroom). chunk_bytes bounds the temporaries."""
    trash = dst.numel() - 1
    j = torch.arange(max_size, device=src.device)
    per_chunk = max(1, chunk_bytes // max_size)
    for s in range(0, size.numel(), per_chunk):
        inside = j < size[s:s + per_chunk, None]
        read = torch.where(inside, src_offset[s:s + per_chunk, None] + j, 0)
        write = torch.where(inside, dst_offset[s:s + per_chunk, None] + j, trash)
        dst[write.reshape(-1)] = src[read.reshape(-1)]
