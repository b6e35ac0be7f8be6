"""Evaluation: metrics (paired error, Fréchet distance, CLIP score), the harness that samples every few-step
sampler from the teacher's noise, reports, baselines (reflow) and the ``scfm-eval`` command."""
