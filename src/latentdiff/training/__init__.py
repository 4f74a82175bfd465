"""Training: one loop with seams, its stages, checkpoints, the run directory, DDP."""
