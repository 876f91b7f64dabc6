"""The Llama-family decoder (Llama, Mistral, Qwen2) over flattened tokens with paged attention.

It knows nothing of LoRA, the engine or HTTP: linear layers are `Linear` modules that other
packages may replace (LoRA wrappers, quantized layers) without touching this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models import cpu_fused, cpu_gemm
from loraplex.models.attention import PagedAttention
from loraplex.models.batch import ForwardBatch
from loraplex.models.config import ModelConfig
from loraplex.models.layers import BaseLinear, Linear, RMSNorm, dense_linear, dense_tiling
from loraplex.models.row_tiles import Tiling
from loraplex.models.rope import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        parts = cfg.linear_parts()
        self.qkv_proj = Linear(cfg.hidden_size, [(p, parts[p][1]) for p in ("q_proj", "k_proj", "v_proj")], cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, [("o_proj", parts["o_proj"][1])], cfg.o_bias)
        self.rotary = rotary
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_windows[layer])

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        cfg = self.cfg
        qkv = self.qkv_proj(x, batch)  # [T, q + 2kv]
        q, k, v = self.rotary(batch.positions, qkv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        return self.o_proj(self.attn(q, k, v, batch), batch)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        parts = cfg.linear_parts()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, [(p, parts[p][1]) for p in ("gate_proj", "up_proj")])
        self.down_proj = Linear(cfg.intermediate_size, [("down_proj", parts["down_proj"][1])])

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, batch)  # [T, 2I]
        if cpu_fused.supported(gate_up):
            return self.down_proj(cpu_fused.silu_mul(gate_up), batch)
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up, batch)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """x: this layer's input, residual: the stream so far (None at the first layer); returns the same pair
        for the next layer. The pair sums to what `x + attn(norm(x))`, then `+ mlp(norm(.))`, gives."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, batch)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, batch), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, [("lm_head", cfg.vocab_size)])
        self.head_packed: torch.Tensor | None = None  # tied head in oneDNN's layout (prepack)
        self.head_tiling: Tiling | None = None  # its calls' cut when batch-invariant

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # input_ids: [T] -> logits [N, V] (fp32) for the tokens in batch.logits_index
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(x, residual, batch)
        assert residual is not None
        rows = batch.logits_index
        x, _ = self.norm(x.index_select(0, rows), residual.index_select(0, rows))
        if self.lm_head is not None:
            return self.lm_head(x).float()
        return dense_linear(x, self.embed_tokens.weight, None, self.head_packed, self.head_tiling).float()

    def prepack(self, batch_invariant: bool = False) -> int:
        """Prepack every base Linear and the LM head for the CPU GEMM (see cpu_gemm); returns how many.
        A tied head keeps the plain embedding for lookups and adds a packed copy for the logits. With
        `batch_invariant`, each packed linear runs in row tiles whose results do not depend on the other rows."""
        n = sum(m.prepack(batch_invariant) for m in self.modules() if isinstance(m, BaseLinear))
        if self.lm_head is not None:  # its own BaseLinear (an untied head, or a GGUF file's tied blocks)
            return n
        head = self.embed_tokens.weight
        if self.head_packed is None and cpu_gemm.supported(head):
            self.head_packed = cpu_gemm.pack(head)
            n += 1
        if batch_invariant and self.head_tiling is None and head.device.type == "cpu":
            self.head_tiling = dense_tiling(head, self.head_packed)
        return n

    def linear_tilings(self) -> list[Tiling | None]:
        """Each base linear's batch-invariant tiling (None: without one), the LM head last."""
        tilings = [m.tiling for m in self.modules() if isinstance(m, BaseLinear)]
        return tilings if self.lm_head is not None else tilings + [self.head_tiling]

    def attention_modules(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]
