"""Training engine: loop, checkpoints, EMA, stats, export, evaluation."""
