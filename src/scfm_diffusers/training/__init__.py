"""SCFM training library: configuration, the per-step losses, grid sampling, the objective, the dual LoRA EMA,
data and its cache, checkpoints and the components the training script wires."""
