"""lit_xf: memory-efficient GPT training with PyTorch Lightning and xFormers."""

from lit_xf.config import GPTConfig
from lit_xf.model import TinyGPT
from lit_xf.module import LitTinyGPT

__all__ = ["GPTConfig", "LitTinyGPT", "TinyGPT"]
__version__ = "0.1.0"
