"""Command line: `kvcomp-hf demo` and `kvcomp-hf presets`.

Every flag is checked before anything heavy is imported or loaded: a bad value is one line on stderr
and exit status 2. (Inside the console script `import kvcomp_hf` does not import transformers; see
kvcomp_hf/__init__.py.)
"""

from __future__ import annotations

import argparse
import re
import sys

from .config import BACKENDS

DTYPES = ("auto", "float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(prog: str, message: str):
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)


def check_demo_args(args) -> str:
    """Check every demo flag without loading the model; returns the device to use (cpu, cuda or cuda:N).
    Raises ValueError with the message to show."""
    from .config import load_preset
    from .demo import MAX_TOKENS, MIN_TOKENS
    from .model_files import smollm2_dir

    if not MIN_TOKENS <= args.tokens <= MAX_TOKENS:
        raise ValueError(f"--tokens must be between {MIN_TOKENS} and {MAX_TOKENS} (SmolLM2's context is 8192 "
                         f"positions, 16 of them for the answer), got {args.tokens}")
    load_preset(args.preset)  # names the available presets when it fails
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    device = args.device
    if device != "cpu" or args.backend == "triton":
        import torch  # only now: about a second

        cuda = torch.cuda.is_available()
        if device == "auto":
            device = "cuda" if cuda else "cpu"
        elif not cuda:
            raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu or auto")
        elif ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    if args.backend == "triton":
        import importlib.util

        if not device.startswith("cuda"):
            raise ValueError("--backend triton needs a CUDA GPU (the Triton kernels run on CUDA only); "
                             "use --backend auto or torch")
        if importlib.util.find_spec("triton") is None:
            raise ValueError("--backend triton needs the triton package (pip install triton)")
        if args.dtype == "float32":
            raise ValueError("--backend triton serves float16/bfloat16 models; use --dtype bfloat16 or float16")
    smollm2_dir()  # the model file: FileNotFoundError says how to install it
    return device


def list_presets() -> None:
    """One line per shipped preset: calibrated or not, and its config."""
    from .config import available_presets, preset_info

    for name in available_presets():
        info = preset_info(name)
        status = "calibrated" if info["calibrated"] else "not calibrated"
        on = f" on {info['model']}" if info["calibrated"] and info.get("model") else ""
        config = ", ".join(f"{key}={value}" for key, value in info["config"].items())
        print(f"{name}: {status}{on}; {config}")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="kvcomp-hf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="passkey question over ~4K tokens: full cache vs kvcomp on SmolLM2-135M")
    demo.add_argument("--tokens", type=int, default=4000, help="prompt length in tokens, chat template included "
                      "(default 4000)")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    demo.add_argument("--preset", default="smollm2-135m-instruct", help="kvcomp preset name (kvcomp-hf presets)")
    demo.add_argument("--backend", default="auto", choices=BACKENDS,
                      help="kvcomp backend: auto (Triton on CUDA), torch or triton")
    demo.add_argument("--dtype", default="auto", choices=DTYPES,
                      help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    sub.add_parser("presets", help="list the shipped presets, which are calibrated, and their configs")
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            device = check_demo_args(args)
        except (ValueError, FileNotFoundError) as err:
            _fail("kvcomp-hf demo", str(err))
        from .demo import run_demo

        run_demo(tokens=args.tokens, device=device, preset=args.preset, backend=args.backend, dtype=args.dtype)
    elif args.command == "presets":
        list_presets()


if __name__ == "__main__":
    main()
