"""Read a PEFT LoRA adapter directory and validate it against the base model, refusing what we don't support.

A directory holds adapter_config.json and adapter_model.safetensors (adapter_model.bin only with an
explicit opt-in, loaded with weights_only=True). Every unsupported feature is an error that names it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraplex.errors import (
    AdapterFormatError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    AdapterRankError,
    UnsupportedAdapterFeatureError,
)
from loraplex.lora.layers import PartWeights

log = logging.getLogger(__name__)

# "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" (optionally ".lora_A.<adapter>.weight")
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_FORBIDDEN_TARGETS = {"embed_tokens": "embedding LoRA (target embed_tokens)", "lm_head": "lm_head LoRA"}


@dataclass(slots=True)
class AdapterWeights:
    """A validated adapter on the host: (layer, part) -> PartWeights, in fp32."""

    name: str
    path: Path
    rank: int
    parts: dict[tuple[int, str], PartWeights] = field(default_factory=dict)
    base_model_name: str | None = None
    digest: bytes = b""  # sha256 of adapter_config.json and the weights file as read: the weights' identity

    @property
    def nbytes(self) -> int:
        return sum(w.a.numel() * w.a.element_size() + w.b.numel() * w.b.element_size() for w in self.parts.values())


def _check_config(cfg: dict[str, Any], path: Path) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterFeatureError(f"adapter {path}: PEFT method {peft_type} is not supported; only LORA is")
    refusals = {
        "use_dora": "DoRA (use_dora=true)",
        "modules_to_save": "modules_to_save",
        "layer_replication": "layer_replication",
        "trainable_token_indices": "trainable_token_indices",
        "target_parameters": "target_parameters (LoRA on parameters)",
        "lora_bias": "lora_bias",
        "use_qalora": "QALoRA (use_qalora=true)",
        "fan_in_fan_out": "fan_in_fan_out",
    }
    for key, feature in refusals.items():
        if cfg.get(key):
            raise UnsupportedAdapterFeatureError(f"adapter {path}: {feature} is not supported")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedAdapterFeatureError(f"adapter {path}: bias={cfg['bias']!r} is not supported; only 'none' is")
    targets = cfg.get("target_modules") or []
    names = [targets] if isinstance(targets, str) else list(targets)
    for t in names:
        for module, feature in _FORBIDDEN_TARGETS.items():
            if module in t:
                raise UnsupportedAdapterFeatureError(f"adapter {path}: {feature} is not supported")


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first pattern matching the end of the module's qualified name (model.layers.3.self_attn.q_proj), as
    PEFT matches rank_pattern and alpha_pattern keys (checked by _patterns)."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    key = _pattern_key(patterns, module)
    return default if key is None else patterns[key]


def _patterns(cfg: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    """cfg[key] (alpha_pattern, rank_pattern): a JSON object whose keys are valid regular expressions."""
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterFormatError(f"adapter {path}: {key} must be a JSON object of module-name patterns, "
                                 f"not {type(patterns).__name__}")
    for pattern in patterns:
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error as e:
            raise AdapterFormatError(f"adapter {path}: {key} key {pattern!r} is not a valid regular expression: {e}") from e
    return patterns


def _number(value: Any, what: str, path: Path) -> float:
    """A config number (lora_alpha, an alpha_pattern value) as a float; a string, list or null is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterFormatError(f"adapter {path}: {what} must be a number, got {value!r}")
    return float(value)


def max_file_bytes(targets: dict[tuple[int, str], tuple[int, int]], max_rank: int) -> int:
    """The largest weight file a servable adapter can have: A and B of rank `max_rank` on every target, stored as
    float64 (the widest dtype PEFT writes), plus 1 MiB of headers. A bigger file cannot fit the adapter slots."""
    return sum((i + o) * max_rank * 8 for i, o in targets.values()) + (1 << 20)


def _check_size(file: Path, limit: int | None) -> None:
    """Refuse before reading: a huge file must not fill host memory while it is read and validated."""
    size = file.stat().st_size
    if limit is not None and size > limit:
        raise AdapterFormatError(
            f"adapter {file.parent}: {file.name} is {size / 2**20:.1f} MiB, more than the {limit / 2**20:.1f} MiB "
            "that LoRA weights of rank <= --max-lora-rank on this model's layers can take; it is not a servable adapter")


def _read_tensors(path: Path, allow_pickle: bool, digest: Any, limit: int | None = None) -> dict[str, torch.Tensor]:
    """The weight file's tensors; its bytes, as read, go into `digest` (a hashlib object). Files over `limit`
    bytes are refused unread."""
    st = path / "adapter_model.safetensors"
    if st.is_file():
        _check_size(st, limit)
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            data = st.read_bytes()
            digest.update(data)  # hashlib releases the GIL here: the engine thread keeps stepping
            return load(data)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise AdapterFormatError(f"adapter {path}: corrupt safetensors file {st.name}: {e}") from e
    binary = path / "adapter_model.bin"
    if binary.is_file():
        if not allow_pickle:
            raise AdapterFormatError(
                f"adapter {path}: only adapter_model.bin (pickle) found; safetensors is required unless "
                "pickled adapters are allowed (--allow-pickle-adapters)"
            )
        _check_size(binary, limit)
        try:
            data = binary.read_bytes()
            digest.update(data)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # any unpickling failure is a format error of this file
            raise AdapterFormatError(f"adapter {path}: cannot read adapter_model.bin: {e}") from e
    raise AdapterFormatError(f"adapter {path}: no adapter_model.safetensors found")


def load_peft_adapter(
    name: str,
    path: Path,
    targets: dict[tuple[int, str], tuple[int, int]],
    max_rank: int,
    allow_pickle: bool = False,
) -> AdapterWeights:
    """Load and validate. `targets` maps (layer, part) -> (in_features, out_features) of the base model."""
    if not path.is_dir():
        raise AdapterNotFoundError(f"adapter {name!r}: directory {path} does not exist")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterFormatError(f"adapter {path}: adapter_config.json is missing")
    digest = hashlib.sha256()
    try:
        raw = cfg_path.read_bytes()
        digest.update(raw)
        cfg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"adapter {path}: adapter_config.json is not valid JSON: {e}") from e
    except OSError as e:  # a file the server may not read (permissions, an I/O error): the adapter's fault, a 400
        raise AdapterFormatError(f"adapter {path}: cannot read adapter_config.json: {e.strerror or e}") from e
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"adapter {path}: adapter_config.json must hold a JSON object")
    _check_config(cfg, path)
    tensors = _read_tensors(path, allow_pickle, digest, max_file_bytes(targets, max_rank))

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    module_names: dict[tuple[int, str], str] = {}
    for key, tensor in tensors.items():
        if "lora_magnitude_vector" in key:
            raise UnsupportedAdapterFeatureError(f"adapter {path}: DoRA (lora_magnitude_vector) is not supported")
        if "lora_embedding" in key or "embed_tokens" in key:
            raise UnsupportedAdapterFeatureError(f"adapter {path}: embedding LoRA is not supported")
        if "lm_head" in key:
            raise UnsupportedAdapterFeatureError(f"adapter {path}: lm_head LoRA is not supported")
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterIncompatibleError(f"adapter {path}: tensor {key!r} does not match any LoRA target of the base model")
        layer, block, part, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        # The module's name in the transformers model: what PEFT matches rank_pattern and alpha_pattern against.
        module_names[(layer, part)] = f"model.layers.{layer}.{block}.{part}"
        if (layer, part) not in targets:
            valid = sorted({p for _, p in targets})
            raise AdapterIncompatibleError(
                f"adapter {path}: {key!r} targets layer {layer} module {part!r}, which the base model lacks "
                f"(layers 0-{max(l for l, _ in targets)}, modules {', '.join(valid)})"
            )
        pairs.setdefault((layer, part), {})[ab] = tensor
    if not pairs:
        raise AdapterFormatError(f"adapter {path}: no LoRA weights found")

    alpha = _number(cfg.get("lora_alpha", cfg.get("r", 8)), "lora_alpha", path)
    alpha_pattern = _patterns(cfg, "alpha_pattern", path)
    rank_pattern = _patterns(cfg, "rank_pattern", path)
    # Each module's rank in the config (its rank_pattern entry, else r) must be its tensors' rank, as PEFT requires
    # (it fails to load such an adapter); a config without r declares none.
    default_r = cfg.get("r")
    use_rslora = bool(cfg.get("use_rslora", False))
    weights = AdapterWeights(name=name, path=path, rank=0, base_model_name=cfg.get("base_model_name_or_path"),
                             digest=digest.digest())
    for (layer, part), ab in sorted(pairs.items()):
        if "A" not in ab or "B" not in ab:
            raise AdapterFormatError(f"adapter {path}: layer {layer} {part} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        in_f, out_f = targets[(layer, part)]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] == 0:
            raise AdapterFormatError(
                f"adapter {path}: layer {layer} {part} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "LoRA needs 2-D matrices of rank r >= 1 (lora_A [r, in], lora_B [out, r])")
        r, module = a.shape[0], module_names[(layer, part)]
        pattern = _pattern_key(rank_pattern, module)
        declared = default_r if pattern is None else rank_pattern[pattern]
        if declared is not None and r != _number(declared, f"the rank of {module}", path):
            where = "r" if pattern is None else f"rank_pattern[{pattern!r}]"
            raise AdapterFormatError(
                f"adapter {path}: adapter_config.json says {where} = {declared:g} for {module}, but its lora_A has "
                f"rank {r}; the config and the weights must agree (PEFT refuses this adapter too)")
        if a.shape[1] != in_f or b.shape != (out_f, r):
            raise AdapterIncompatibleError(
                f"adapter {path}: layer {layer} {part} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"the base model needs lora_A [r, {in_f}] and lora_B [{out_f}, r]. Was it trained for a different base model?"
            )
        if r > max_rank:
            raise AdapterRankError(
                f"adapter {name!r} has rank {r} > --max-lora-rank {max_rank}; restart with --max-lora-rank {r}"
            )
        module_alpha = _number(_pattern_value(alpha_pattern, module, alpha),
                               f"the lora_alpha of layer {layer} {part}", path)
        scale = module_alpha / math.sqrt(r) if use_rslora else module_alpha / r
        weights.parts[(layer, part)] = PartWeights(a=a.float().contiguous(), b=b.float().contiguous(), scale=scale)
        weights.rank = max(weights.rank, r)
    check_effective_weights(weights, path)
    return weights


# The bound on every effective LoRA weight (|A| and |B * scale|, element by element). Trained adapters sit far
# below it: PEFT starts A at ~1/sqrt(in) and B at 0, and their effective weights stay within ~0.01-10 like the
# base model's own (tests/conftest.py's adapters and the demo tenants peak near 1). A weight above it is a broken
# or hostile file (lora_alpha 1e300, weights scaled to overflow); refused, it never reaches a slot. It also lies
# below every serving dtype's finite range (float16's 65504, bfloat16's and float32's 3.4e38) with room for the
# activations it multiplies, so B * scale cast to the serving dtype is always finite.
MAX_EFFECTIVE_WEIGHT = 1e4
_F32_MAX = float(torch.finfo(torch.float32).max)  # B * scale is computed in float32 (LoRALinear.set_slot)


def check_effective_weights(weights: AdapterWeights, path: Path) -> None:
    """Refuse NaN or infinite weights, a scale that overflows float32, and effective weights (A, B * scale) above
    MAX_EFFECTIVE_WEIGHT, naming the layer, part and value (AdapterFormatError: HTTP 400). Every route to a slot
    (start-up --lora-modules, runtime loads, --adapter-dir discovery, cluster replicas) loads through
    load_peft_adapter, so none skips it. One fused max-abs over every tensor (NaN propagates into it)."""
    keys = list(weights.parts)
    tensors = [t for k in keys for t in (weights.parts[k].a, weights.parts[k].b)]
    peaks = torch.stack(torch._foreach_norm(tensors, float("inf"))).tolist()  # max |w| per tensor
    for i, (layer, part) in enumerate(keys):
        _check_part(f"adapter {path}: layer {layer} {part}", peaks[2 * i], peaks[2 * i + 1], weights.parts[(layer, part)].scale)


def _check_part(where: str, peak_a: float, peak_b: float, scale: float) -> None:
    if not (math.isfinite(peak_a) and math.isfinite(peak_b)):
        raise AdapterFormatError(f"{where} has NaN or infinite weights")
    if not math.isfinite(scale) or abs(scale) > _F32_MAX or peak_b * abs(scale) > _F32_MAX:
        raise AdapterFormatError(f"{where}: lora_alpha/r scale {scale:g} makes B*scale infinite in float32; "
                                 "check lora_alpha in adapter_config.json")
    for name, value in (("lora_A", peak_a), ("lora_B * lora_alpha/r", peak_b * abs(scale))):
        if value > MAX_EFFECTIVE_WEIGHT:
            raise AdapterFormatError(
                f"{where}: |{name}| reaches {value:.3g}, above the {MAX_EFFECTIVE_WEIGHT:g} bound on effective LoRA "
                "weights (trained adapters stay near 1); check lora_alpha and the weights")
