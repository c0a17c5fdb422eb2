"""Evaluation scripts for kvcomp-hf, run from the repository root as `python -m eval.<script>`; shared plumbing in
eval/common/."""
