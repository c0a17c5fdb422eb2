"""SASS instructions of the Triton kernels, compiled for sm_90 without a GPU.

    python -m eval.sass_count                                  # decode: fixed layout, 4-bit K and V, D 128, GQA 4
    python -m eval.sass_count BITS_V=3 SPLIT_V=False           # constexpr overrides
    python -m eval.sass_count maxnreg=168 num_warps=4          # launch options
    python -m eval.sass_count store                            # store kernels, packed 4/2 and fixed 4/4, D 128

Compiles with the installed Triton for an H100/H200 target (GPUTarget("cuda", 90, 32)) and disassembles the cubin
with Triton's bundled cuobjdump. Decode: `_tokens_in_m_kernel`'s registers, spills and, for every loop (a backward
branch), its instruction count by opcode; one iteration of the block loop is one 64-token block of one KV head.
Store: registers and instructions per thread of the statistics and pack programs (one (block, head) each,
straight-line code), with and without the vector-load hint (ALIGNED). Stride arguments equal to 1 are treated as
Triton specialises them, and those divisible by 16 are marked so. Counts differ by a few percent between Triton
versions (kernels/NOTES.md)."""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile

POINTERS = {"q_ptr": "*bf16", "kt_ptr": "*bf16", "vt_ptr": "*bf16", "pool32": "*i32", "so_ptr": "*i64",
            "tmin_ptr": "*bf16", "tstep_ptr": "*bf16", "bt_ptr": "*i32", "valid_ptr": "*i32", "m_ptr": "*fp32",
            "l_ptr": "*fp32", "acc_ptr": "*fp32", "ctl_ptr": "*i32", "split_ptr": "*i32"}
DEFAULTS = dict(GROUP=4, QLEN=1, M=16, D=128, P=64, BITS_K=4, BITS_V=4, WB_K=3, WB_V=3, META_K=0, META_V=0,
                CJ_K=8, CJ_V=8, FIXED_K=True, FIXED_V=True, TOKEN_GRAN=True, HAS_MASK=False, Q_SPLIT=False, TAIL=False,
                INTERP=False, SPLIT_V=True, DEV=False, PRMT=True,
                tm_t=1, ts_t=1, sq_d=1, skt_d=1, svt_d=1)  # unit strides: specialised by Triton


def _compile(fn, const: dict, pointers: dict, options: dict, divisible=()):
    """(cuobjdump --dump-resource-usage text, SASS instructions) of fn compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    # constexpr parameters left out take their defaults (not an i32 argument, which would compile both branches)
    const = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty},
             **const}
    sig = {n: "constexpr" if n in const else pointers.get(n, "fp32" if n in ("scale_log2", "rel_k", "rel_v") else "i32")
           for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in const and (sig[n].startswith("*") or n in divisible)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                             capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s+/\*([0-9a-f]{4,6})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    return " ".join(re.findall(r"REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+", res)), ins


def _opcodes(body) -> collections.Counter:
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)


def decode(argv: list[str]) -> None:
    from kvcomp_hf.kernels import decode_attention as entry

    fn = sys.modules[entry.__module__]._tokens_in_m_kernel
    const = dict(DEFAULTS)
    options = {"num_warps": 4, "num_stages": 1}
    for item in argv:
        name, _, value = item.partition("=")
        if name in ("maxnreg", "num_warps"):  # launch options, not kernel arguments
            options[name] = int(value)
            continue
        if name not in fn.arg_names:
            raise SystemExit(f"unknown kernel argument {name!r}; constexprs: {sorted(k for k in DEFAULTS if k.isupper())}")
        const[name] = eval(value, {})  # noqa: S307 (numbers and True/False from the command line)
    usage, ins = _compile(fn, const, POINTERS, options)
    print(usage)
    for addr, text in ins:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            print(f"loop {lo:#x}-{addr:#x}: {len(body)} instructions;",
                  " ".join(f"{k}:{v}" for k, v in _opcodes(body).most_common(24)))


STORE_POINTERS = {"k_ptr": "*bf16", "v_ptr": "*bf16", "part_ptr": "*fp32", "tmin_ptr": "*bf16", "tstep_ptr": "*bf16",
                  "so_ptr": "*i64", "segbytes_ptr": "*i64", "pool_used_ptr": "*i64", "dst32": "*i32"}


def store(warps: int = 16) -> None:
    import triton

    from kvcomp_hf.codec import BlockFormat, width_bits
    from kvcomp_hf.kernels import store_blocks
    from kvcomp_hf.kernels.decode_attention import chunk_fields

    sm = sys.modules[store_blocks.__module__]
    unit = {"ks_d": 1, "vs_d": 1, "tm_t": 1, "ts_t": 1}
    print(f"instructions per thread, {warps} warps, D 128, 8 KV heads, bf16, granularity token")
    for aligned in (False, True):
        usage, ins = _compile(sm._head_stats_kernel, {"D": 128, "ALIGNED": aligned, "ks_d": 1, "vs_d": 1},
                              STORE_POINTERS, {"num_warps": warps, "num_stages": 1}, ("ks_t", "vs_t"))
        print(f"_head_stats_kernel ALIGNED={aligned}: {len(ins)} ({usage}); {dict(_opcodes(i for _, i in ins).most_common(6))}")
    for bits_k, bits_v, layout in ((4, 2, "packed"), (4, 2, "fixed_v"), (4, 4, "fixed")):
        fmt = BlockFormat(num_heads=8, head_dim=128, pack_size=64, bits_k=bits_k, bits_v=bits_v, granularity="token",
                          repack="none", layout=layout)
        const = dict(unit, D=128, BITS_K=bits_k, BITS_V=bits_v, META_K=fmt.meta_bytes(0), META_V=fmt.meta_bytes(1),
                     SEG_K=fmt.max_segment_bytes(0), SEG_V=fmt.max_segment_bytes(1), TOKEN_GRAN=True, HP=8,
                     WB_K=width_bits(bits_k), WB_V=width_bits(bits_v),
                     MW_K=triton.next_power_of_2(max(1, fmt.meta_bytes(0) // 4)),
                     MW_V=triton.next_power_of_2(max(1, fmt.meta_bytes(1) // 4)),
                     CW_K=2 * triton.next_power_of_2(bits_k), CW_V=2 * triton.next_power_of_2(bits_v),
                     CJ_K=chunk_fields(bits_k, 64), CJ_V=chunk_fields(bits_v, 64), FIXED_K=fmt.fixed(0),
                     FIXED_V=fmt.fixed(1))
        usage, ins = _compile(sm._pack64_kernel, const, STORE_POINTERS, {"num_warps": warps, "num_stages": 1},
                              ("ks_t", "vs_t"))
        print(f"_pack64_kernel {layout} {bits_k}/{bits_v}: {len(ins)} ({usage}); "
              f"{dict(_opcodes(i for _, i in ins).most_common(6))}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["store"]:
        store(int(argv[1]) if len(argv) > 1 else 16)
    else:
        decode(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
