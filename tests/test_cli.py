"""`kvcomp-hf`: every demo flag is checked before anything loads (one line, exit 2), the command starts without
importing transformers, `presets` says which presets are calibrated, and the demo prompt has the length asked for."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvcomp_hf.demo
from kvcomp_hf import KVCompConfig, cli

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the demo started before its flags were checked")

    monkeypatch.setattr(kvcomp_hf.demo, "run_demo", refuse)
    monkeypatch.setattr(kvcomp_hf.demo, "load_smollm2", refuse)


@pytest.mark.parametrize("args,message", [
    (["--preset", "nosuch"], "unknown preset 'nosuch'; available: ["),
    (["--preset", "../../etc/passwd"], "preset must be a preset name"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--tokens", "100"], "--tokens must be between 200 and 8176"),
    (["--tokens", "9000"], "--tokens must be between 200 and 8176"),
    (["--tokens", "many"], "invalid int value"),
    (["--backend", "cuda"], "invalid choice"),
    pytest.param(["--backend", "triton"], "--backend triton needs a CUDA GPU", marks=NO_CUDA),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available", marks=NO_CUDA),
    pytest.param(["--device", "cuda:1", "--backend", "torch"], "CUDA is not available", marks=NO_CUDA),
])
def test_bad_demo_flags_fail_in_one_line_before_anything_loads(args, message, nothing_loads, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_triton_backend_needs_a_16_bit_dtype(nothing_loads, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--backend", "triton", "--dtype", "float32", "--device", "cuda"])
    assert "--backend triton serves float16/bfloat16 models" in capsys.readouterr().err


def test_presets_say_which_are_calibrated(capsys):
    cli.main(["presets"])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["smollm2-135m-instruct"].startswith("calibrated on HuggingFaceTB/SmolLM2-135M-Instruct; rel_k=0.0666667")
    default = KVCompConfig()
    assert lines["default"].startswith(f"not calibrated; rel_k={default.rel_k}, rel_v={default.rel_v}")


def run_command(*args):
    """The installed console script, with Python's import log on stderr."""
    script = shutil.which("kvcomp-hf", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the kvcomp-hf console script is not installed in this environment (pip install -e .)")
    return subprocess.run([sys.executable, "-X", "importtime", script, *args], capture_output=True, text=True,
                          timeout=120)


def imported(stderr):
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args,heavy", [(["--help"], ("torch", "transformers")),
                                        (["presets"], ("torch", "transformers")),
                                        (["demo", "--preset", "nosuch"], ("torch", "transformers")),
                                        (["demo", "--device", "cuda"], ("transformers",))])
def test_the_command_starts_without_importing_transformers(args, heavy):
    result = run_command(*args)
    modules = imported(result.stderr)
    assert "kvcomp_hf.cli" in modules
    assert not [m for m in modules if m.split(".")[0] in heavy]
    assert result.returncode == (0 if args in (["--help"], ["presets"]) else 2)


def test_importing_kvcomp_hf_still_registers_with_transformers():
    code = ("import kvcomp_hf, transformers.generation.configuration_utils as g; "
            "from transformers import AttentionInterface; "
            "print('kvcomp' in AttentionInterface(), 'kvcomp' in g.ALL_CACHE_IMPLEMENTATIONS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "True"], out.stderr


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from kvcomp_hf.model_files import SMOLLM2_GGUF, smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


@pytest.mark.parametrize("tokens", [200, 300, 777, 4000, 8176])
def test_demo_prompt_has_the_length_asked_for(tokens, smollm2_tokenizer):
    messages = kvcomp_hf.demo.passkey_messages(smollm2_tokenizer, tokens, key=52817)
    ids = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    assert abs(len(ids) - tokens) <= 2
    assert "The pass key is 52817." in messages[0]["content"]


@pytest.mark.slow
def test_demo_on_cpu_says_it_is_slower_and_reports_allocated_bytes(capsys):
    cli.main(["demo", "--tokens", "300", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "note: on CPU kvcomp is slower than the full cache" in out
    assert "x the full cache's time on this CPU" in out
    prompt = int(out.split("prompt: ")[1].split()[0])
    assert abs(prompt - 300) <= 2
    assert out.count("MiB allocated") == 2 and "pass key found by kvcomp: True" in out
