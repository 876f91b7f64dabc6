"""`loraplex merge`: fold a hot tenant's adapter into the base weights and write a standalone model directory
(safetensors, config, tokenizer) that `loraplex serve` and transformers load as a base model."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from loraplex.adapters.peft_format import load_peft_adapter
from loraplex.errors import InvalidRequestError
from loraplex.models.config import load_model_config
from loraplex.models.loader import resolve_model

log = logging.getLogger(__name__)


def _target_shapes(model_dir: Path) -> dict[tuple[int, str], tuple[int, int]]:
    c = load_model_config(model_dir)
    return {(layer, part): shape for layer in range(c.num_layers) for part, shape in c.linear_parts().items()}


def merge(adapter: Path, output: Path, base: str | None = None, overwrite: bool = False) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if output.exists() and any(output.iterdir()) and not overwrite:
        raise InvalidRequestError(f"output directory {output} exists; pass --overwrite to replace it")
    model_dir = resolve_model(base)
    # Validate with our own checks first: clear errors for unsupported features or a different base.
    load_peft_adapter(adapter.name, adapter, _target_shapes(model_dir), max_rank=1 << 16)
    config = load_model_config(model_dir)
    dtype = getattr(torch, config.torch_dtype) if isinstance(config.torch_dtype, str) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # merge in fp32, save in the base dtype
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.to(dtype)
    merged.config.name_or_path = output.name
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=".merge-"))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged %s into %s -> %s", adapter, model_dir, output)
    return output
