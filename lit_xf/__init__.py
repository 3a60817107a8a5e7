"""lit_xf: memory-efficient GPT training with PyTorch Lightning and xFormers."""

__version__ = "0.1.0"
