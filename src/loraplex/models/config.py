"""ModelConfig: the architecture facts our forward pass needs, parsed from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loraplex.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool = False  # Llama's attention_bias puts a bias on o_proj too; Qwen2's q/k/v bias does not
    # Per-layer sliding-window size (None = full attention), length num_layers.
    sliding_windows: tuple[int | None, ...] = field(default=())
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str | None = None
    name: str = ""

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    def linear_parts(self) -> dict[str, tuple[int, int]]:
        """Every decoder layer's linear parts, named as checkpoints and PEFT name them -> (in, out features).
        The one statement of these shapes: the model's packed layers, LoRA validation, merge and benchmarks."""
        h, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters`; older configs write `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE scaling type {rope_type!r} is not supported; supported types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
        ),
    )


def _sliding_windows(cfg: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types:
        # transformers 5 states per layer whether it uses sliding attention.
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if arch == "Qwen2ForCausalLM":
        if not cfg.get("use_sliding_window", False) or window is None:
            return (None,) * num_layers
        max_window_layers = int(cfg.get("max_window_layers", num_layers))
        return tuple(window if i >= max_window_layers else None for i in range(num_layers))
    if arch == "MistralForCausalLM" and window is not None:
        return (int(window),) * num_layers
    return (None,) * num_layers


def model_config_from_dict(cfg: dict[str, Any], name: str = "") -> ModelConfig:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM"}.get(cfg.get("model_type", ""), "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch or cfg.get('model_type')!r} is not supported; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {cfg.get('hidden_act')!r} is not supported; only 'silu' is")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    num_layers = int(cfg["num_hidden_layers"])
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    # transformers: Llama's attention_bias biases q/k/v *and* o_proj; Qwen2 always biases q/k/v only;
    # Mistral has no attention biases whatever its config says.
    llama_bias = arch == "LlamaForCausalLM" and bool(cfg.get("attention_bias", False))
    qkv_bias = arch == "Qwen2ForCausalLM" or llama_bias
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rope=_rope_from_hf(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=llama_bias,
        sliding_windows=_sliding_windows(cfg, arch, num_layers),
        eos_token_ids=eos_ids,
        bos_token_id=cfg.get("bos_token_id"),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        name=name,
    )


def load_model_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    # Our GGUF cache directories carry a hash suffix; their config records the model's plain name.
    recorded = cfg.get("_name_or_path")
    ok = isinstance(recorded, str) and bool(recorded) and model_dir.name.startswith(recorded)
    name = recorded if ok else model_dir.name
    mcfg = model_config_from_dict(cfg, name=name)
    # transformers' generate stops at generation_config.json's eos ids (Llama 3 lists several there):
    # stop at them too, after the config's own.
    extra = _generation_eos_ids(model_dir)
    if extra:
        mcfg = replace(mcfg, eos_token_ids=tuple(dict.fromkeys(mcfg.eos_token_ids + extra)))
    return mcfg


def _generation_eos_ids(model_dir: Path) -> tuple[int, ...]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        return ()  # transformers would refuse it too; config.json's eos ids still apply
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, list):
        return tuple(t for t in eos if isinstance(t, int))
    return ()
