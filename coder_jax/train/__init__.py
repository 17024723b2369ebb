"""Training: state, step, optimizer, losses, checkpoints, metrics."""
