"""``from_hf`` and ``to_hf``: whole folders converted, checked before anything is written, written atomically."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml

from lit_xf.config import FIELD_NAMES, GPTConfig
from lit_xf.convert import gpt2, hf_files, llama, mpt
from lit_xf.convert.family import ConversionError
from lit_xf.model import TinyGPT
from lit_xf.weights import WEIGHTS_FILE, check_fits, load_weights, read_weights, save_weights

#: family name -> its module, in the order ``to_hf`` tries them
FAMILIES: dict[str, ModuleType] = {"gpt2": gpt2, "llama": llama, "mpt": mpt}
FIT_CONFIG = "config.yaml"


@dataclass
class Converted:
    """What a conversion wrote: the folder, the family and HF ``model_type``, the parameter count,
    whether a tokenizer travelled, and notes worth printing."""

    folder: Path
    family: str
    model_type: str
    parameters: int
    tokenizer: bool
    notes: list[str] = field(default_factory=list)


def family_for(model_type: str) -> str:
    """The family that reads ``model_type``; ``ConversionError`` naming the supported ones."""
    for name, module in FAMILIES.items():
        if model_type in module.MODEL_TYPES:
            return name
    known = ", ".join(t for m in FAMILIES.values() for t in m.MODEL_TYPES)
    raise ConversionError(f"model_type {model_type!r} is not supported (supported: {known})")


def _check_model(config: GPTConfig, state_dict: dict[str, torch.Tensor], source: str) -> int:
    """The parameter count of a TinyGPT of ``config`` (built on the meta device) that ``state_dict`` fits."""
    with torch.device("meta"):
        model = TinyGPT(config)
    try:
        check_fits(model, state_dict, source)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    return sum(p.numel() for p in model.parameters())


def _eos_id(hf: dict[str, Any], vocab: int) -> int | None:
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) and 0 <= eos < vocab else None


def from_hf(
    src: str | Path, dest: str | Path, *, seq_len: int | None = None, batch_size: int = 8, overwrite: bool = False
) -> Converted:
    """A Hugging Face folder (``config.json``, safetensors, optionally ``tokenizer.json``) -> ``dest``
    with ``model.safetensors`` (TinyGPT's keys, the architecture in its metadata), ``config.yaml``
    (``lit-xf fit --config dest/config.yaml`` fine-tunes it on packed rows) and the tokenizer.

    ``seq_len``: the fine-tune's row length (default: the model's context, at most 1024; learned
    positions need their table's length)."""
    src, dest = Path(src), Path(dest).absolute()
    hf = hf_files.read_config(src)
    model_type = hf.get("model_type")
    name = family_for(str(model_type))
    family = FAMILIES[name]
    config = family.config_from_hf(hf)
    if config.positions == "learned":
        if seq_len not in (None, config.max_seq_len):
            raise ConversionError(
                f"{model_type} has a learned position table of {config.max_seq_len} rows: fine-tune it with "
                f"seq_len {config.max_seq_len}"
            )
        seq_len = config.max_seq_len
    seq_len = seq_len or min(config.max_seq_len, 1024)
    tensors = hf_files.read_tensors(src)
    dtype = next(iter(tensors.values())).dtype
    state = family.weights_from_hf(tensors, config)
    parameters = _check_model(config, state, f"weights converted from {src}")
    tokenizer_file = src / hf_files.TOKENIZER
    eos = None
    notes = [f"weights kept in {dtype}"]
    if tokenizer_file.is_file():
        from lit_xf.data import FileTokenizer

        vocab = FileTokenizer(tokenizer_file).vocab_size
        eos = _eos_id(hf, vocab)
        if vocab > config.vocab_size:
            raise ConversionError(
                f"{tokenizer_file} has {vocab} tokens but the model only {config.vocab_size} embedding rows"
            )
    else:
        notes.append(f"{src} has no {hf_files.TOKENIZER}: config.yaml trains with the byte tokenizer")
    with hf_files.atomic_folder(dest, overwrite) as tmp:
        save_weights(tmp / WEIGHTS_FILE, config.to_dict(), state)
        if tokenizer_file.is_file():
            shutil.copyfile(tokenizer_file, tmp / hf_files.TOKENIZER)
        fit = _fit_config(config, dest, seq_len, batch_size, tokenizer_file.is_file(), eos)
        header = (
            f"# {model_type} from {src.absolute()}, converted by lit-xf convert ({parameters:,} parameters).\n"
            f"# Fine-tune it on packed rows of your text:\n"
            f"#   lit-xf fit --config {dest / FIT_CONFIG} --data.corpus my_text.txt\n"
            f"# then back to Hugging Face:\n"
            f"#   lit-xf convert to-hf lightning_logs/version_N/checkpoints/last.ckpt <folder>\n"
        )
        (tmp / FIT_CONFIG).write_text(header + yaml.safe_dump(fit, sort_keys=False), encoding="utf-8")
    return Converted(dest, name, str(model_type), parameters, tokenizer_file.is_file(), notes)


def _fit_config(
    config: GPTConfig, dest: Path, seq_len: int, batch_size: int, has_tokenizer: bool, eos: int | None
) -> dict[str, Any]:
    """The ``lit-xf fit`` config that fine-tunes the converted weights on packed rows."""
    arch = {k: v for k, v in config.to_dict().items() if k != "max_seq_len"}  # data.seq_len sets it
    data: dict[str, Any] = {"corpus": "fortunes", "batch_mode": "packed", "seq_len": seq_len, "batch_size": batch_size}
    if has_tokenizer:
        data |= {"tokenizer": "file", "tokenizer_dir": str(dest)}
        if eos is not None:
            data["eos_id"] = eos
    data["model_vocab_size"] = config.vocab_size
    return {
        "model": {"arch": arch, "init_weights": str(dest / WEIGHTS_FILE), "lr": 3.0e-5, "warmup_steps": 10},
        "data": data,
        "trainer": {"max_steps": 100, "log_every_n_steps": 10, "val_check_interval": 50, "limit_val_batches": 8},
    }


def _arch_of(weights_arch: dict[str, Any] | None, src: Path) -> GPTConfig:
    if not weights_arch:
        raise ConversionError(f"{src} does not say which architecture its weights have (no lit_xf arch stored)")
    fields = {k: v for k, v in weights_arch.items() if k in FIELD_NAMES}
    if not isinstance(fields.get("ffn", "swiglu"), str):
        raise ConversionError(f"{src}: ffn={fields['ffn']!r} is a factory; only ffn 'gelu' / 'swiglu' convert")
    return GPTConfig.from_dict(fields)


def to_hf(
    src: str | Path,
    dest: str | Path,
    *,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    shard_bytes: int = hf_files.DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Converted:
    """lit_xf weights (a ``lit-xf fit`` checkpoint, or ``from_hf``'s folder / ``model.safetensors``)
    -> a folder ``transformers.AutoModelForCausalLM.from_pretrained`` loads: ``config.json``,
    safetensors (sharded above ``shard_bytes``), ``tokenizer.json`` where one is stored with the
    weights or lies beside them. ``family``: ``gpt2``, ``llama`` or ``mpt`` (default: the one
    whose architecture matches); ``dtype``: the weights' (default: as stored)."""
    src, dest = Path(src), Path(dest)
    weights = read_weights(src)
    config = _arch_of(weights.arch, src)
    state = {k: v for k, v in weights.state_dict.items()}
    parameters = _check_model(config, state, f"weights {src}")
    names = [family] if family else list(FAMILIES)
    if family and family not in FAMILIES:
        raise ConversionError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    reasons, hf = [], None
    for name in names:
        try:
            hf = FAMILIES[name].config_to_hf(config, dtype or state["tok_emb.weight"].dtype)
            break
        except ConversionError as err:
            reasons.append(str(err))
    if hf is None:
        raise ConversionError("no Hugging Face family fits these weights: " + "; ".join(reasons))
    tensors = FAMILIES[name].weights_to_hf(state, config)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tokenizer_json, eos = _tokenizer_json(weights.tokenizer, src)
    notes = [] if tokenizer_json else ["no tokenizer.json stored with the weights or beside them"]
    if eos is not None:
        hf |= {"eos_token_id": eos, "bos_token_id": eos}
    with hf_files.atomic_folder(dest, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2), encoding="utf-8")
        hf_files.write_tensors(tmp, tensors, shard_bytes)
        if tokenizer_json:
            (tmp / hf_files.TOKENIZER).write_text(tokenizer_json, encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(_tokenizer_config(tokenizer_json, eos), indent=2), encoding="utf-8"
            )
    return Converted(dest, name, hf["model_type"], parameters, bool(tokenizer_json), notes)


def _tokenizer_json(state: dict[str, Any] | None, src: Path) -> tuple[str | None, int | None]:
    """(``tokenizer.json`` text, EOS id) from the stored tokenizer state or the file beside ``src``."""
    if state and state.get("kind") in ("bpe", "file"):
        eos = state.get("eos_id", 0 if state["kind"] == "bpe" else None)
        return state["json"], eos
    folder = src if src.is_dir() else src.parent
    beside = folder / hf_files.TOKENIZER
    if beside.is_file():
        fit = folder / FIT_CONFIG
        eos = None
        if fit.is_file():
            eos = ((yaml.safe_load(fit.read_text(encoding="utf-8")) or {}).get("data") or {}).get("eos_id")
        return beside.read_text(encoding="utf-8"), eos
    return None, None


def _tokenizer_config(tokenizer_json: str, eos: int | None) -> dict[str, Any]:
    """A ``tokenizer_config.json`` that lets ``AutoTokenizer`` load the fast tokenizer."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eos is not None:
        for token in json.loads(tokenizer_json).get("added_tokens", []):
            if token.get("id") == eos:
                config["eos_token"] = token["content"]
    return config


def load_model(path: str | Path, **fields: Any) -> TinyGPT:
    """The TinyGPT stored at ``path`` (see ``lit_xf.weights.read_weights``), ``fields`` overriding
    its architecture's (e.g. ``attention="sdpa"``), in the stored dtype."""
    weights = read_weights(path)
    config = _arch_of(weights.arch, Path(path))
    if fields:
        config = GPTConfig.from_dict(config.to_dict() | fields)
    model = TinyGPT(config)
    dtype = weights.state_dict["tok_emb.weight"].dtype
    load_weights(model.to(dtype), weights.state_dict, source=f"weights {path}")
    return model.eval()
