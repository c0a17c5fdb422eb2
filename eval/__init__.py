"""Evaluation scripts for kvcomp-hf (run as `python eval/<script>.py`)."""
