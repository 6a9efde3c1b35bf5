"""Training: the shared set-up, the distillation loop, pre-training (supervised and MAE), checkpoints and run folders."""
