"""scfm-diffusers: few-step flow matching (SCFM) for diffusers."""

__version__ = "0.1.0"
