"""Evaluation and tuning of checkpoints (evaluate, tune-crf, tune-tiling) and training chips from slides."""
