"""The README's first Python block runs as pasted (on SmolLM2-135M-Instruct, CPU)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_first_readme_snippet_runs_as_pasted(capsys):
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.strip().splitlines()
    assert 0 < float(printed[-1]) < 32  # bits/value of the compressed cache (float32 model on CPU)
