"""SCFM training library: grid sampling, the objective, the dual LoRA EMA and model-family glue."""
