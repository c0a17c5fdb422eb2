"""SASS instructions per loop iteration of the tokens-in-M decode kernel, compiled for sm_90 without a GPU.

    python -m eval.sass_count                                  # fixed layout, 4-bit K and V, D 128, GQA 4
    python -m eval.sass_count BITS_V=3 SPLIT_V=False           # constexpr overrides

Compiles `_tokens_in_m_kernel` with the installed Triton for an H100/H200 target (GPUTarget("cuda", 90, 32)),
disassembles the cubin with Triton's bundled cuobjdump and prints registers, spills and, for every loop (a backward
branch), its instruction count by opcode. One iteration of the block loop is one 64-token block of one KV head.
Stride arguments equal to 1 are treated as Triton specialises them. Counts differ by a few percent between Triton
versions (kernels/NOTES.md)."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

POINTERS = {"q_ptr": "*bf16", "kt_ptr": "*bf16", "vt_ptr": "*bf16", "pool32": "*i32", "so_ptr": "*i64",
            "tmin_ptr": "*bf16", "tstep_ptr": "*bf16", "bt_ptr": "*i32", "valid_ptr": "*i32", "m_ptr": "*fp32",
            "l_ptr": "*fp32", "acc_ptr": "*fp32", "ctl_ptr": "*i32", "split_ptr": "*i32"}
DEFAULTS = dict(GROUP=4, QLEN=1, M=16, D=128, P=64, BITS_K=4, BITS_V=4, WB_K=3, WB_V=3, META_K=0, META_V=0,
                CJ_K=8, CJ_V=8, FIXED=True, TOKEN_GRAN=True, HAS_MASK=False, Q_SPLIT=False, TAIL=False,
                INTERP=False, SPLIT_V=True, DEV=False, PRMT=True,
                tm_t=1, ts_t=1, sq_d=1, skt_d=1, svt_d=1)  # unit strides: specialised by Triton


def main(argv: list[str]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvcomp_hf.kernels import decode_attention as entry

    fn = sys.modules[entry.__module__]._tokens_in_m_kernel
    const = dict(DEFAULTS)
    options = {"num_warps": 4, "num_stages": 1}
    for item in argv:
        name, _, value = item.partition("=")
        if name == "maxnreg":  # a launch option, not a kernel argument
            options["maxnreg"] = int(value)
            continue
        if name not in fn.arg_names:
            raise SystemExit(f"unknown kernel argument {name!r}; constexprs: {sorted(k for k in DEFAULTS if k.isupper())}")
        const[name] = eval(value, {})  # noqa: S307 (numbers and True/False from the command line)
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n in POINTERS:
            sig[n] = POINTERS[n]
        else:
            sig[n] = "fp32" if n == "scale_log2" else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
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
    print(" ".join(re.findall(r"REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+", res)))
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    for addr, text in ins:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            print(f"loop {lo:#x}-{addr:#x}: {len(body)} instructions;",
                  " ".join(f"{k}:{v}" for k, v in ops.most_common(24)))


if __name__ == "__main__":
    main(sys.argv[1:])
