"""Training: optimiser and schedules, checkpoints, the training loop."""
