"""Hugging Face model folders <-> lit_xf weights (``lit-xf convert``).

    from lit_xf.convert import from_hf, to_hf
    from_hf("hf/gpt2", "lit/gpt2")           # model.safetensors + config.yaml (+ tokenizer.json)
    to_hf("runs/.../last.ckpt", "hf/tuned")  # config.json + safetensors (+ tokenizer.json)

One module per family maps names and shapes (``gpt2``, ``llama`` for Llama / Mistral / Qwen2,
``mpt``); ``hf_files`` reads and writes the folders; ``api`` ties them together. Unsupported
architectures and options are refused by name before anything is written; folders appear whole.
"""

from lit_xf.convert.api import FAMILIES, Converted, family_for, from_hf, load_model, to_hf
from lit_xf.convert.family import ConversionError

__all__ = ["FAMILIES", "ConversionError", "Converted", "family_for", "from_hf", "load_model", "to_hf"]
