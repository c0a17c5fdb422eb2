"""Command line: `kvcomp-hf demo` and `kvcomp-hf presets`."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvcomp-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="passkey question over ~4K tokens: full cache vs kvcomp on SmolLM2-135M")
    demo.add_argument("--tokens", type=int, default=4000, help="prompt length in tokens (default 4000)")
    demo.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    demo.add_argument("--preset", default="smollm2-135m-instruct", help="kvcomp preset name")
    demo.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                      help="kvcomp backend: auto (Triton on CUDA), torch or triton")
    demo.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                      help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    sub.add_parser("presets", help="list the shipped presets")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        if args.tokens < 200:
            parser.error(f"--tokens must be at least 200, got {args.tokens}")
        run_demo(tokens=args.tokens, device=args.device, preset=args.preset, backend=args.backend,
                 dtype=args.dtype)
    elif args.command == "presets":
        from .config import available_presets, load_preset

        for name in available_presets():
            print(f"{name}: {load_preset(name)}")


if __name__ == "__main__":
    main()
