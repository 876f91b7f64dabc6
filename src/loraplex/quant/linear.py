"""QuantLinear: a base Linear whose weight is stored 4-bit (NF4/FP4) or 8-bit, by bitsandbytes.

Swapped in for `models.layers.Linear` by module replacement at load (`quantize_model`), before the
LoRA wrappers go on top: LoRA runs in the resolved serving dtype (bf16, fp16 or fp32) and sees a QuantLinear
as its base.

- nf4 / fp4: `bitsandbytes.functional.quantize_4bit`, blocks of 64, optional double quantization of
  the block scales. Each packed part (q, k, v; gate, up) is quantized on its own, as transformers
  quantizes the separate q_proj/k_proj/v_proj modules, so the codes and scales are the ones PEFT's
  QLoRA base holds. Forward: dequantize the parts (bitsandbytes), concatenate, one GEMM in the
  activation dtype: what `bitsandbytes.matmul_4bit` computes, in one GEMM instead of one per part.
- int8: `bitsandbytes.functional.int8_vectorwise_quant`, one absmax scale per output row (LLM.int8's
  weight format). Forward is weight-only int8: activations stay in the serving dtype, y = x (W_int8 * scale)^T,
  by torch's `_weight_int8pack_mm` CPU kernel in bf16 when present, else by dequantizing.
- gguf: a GGUF file's own Q4_0 / Q4_1 / Q8_0 blocks (quant/gguf.py builds them with `of_gguf`), CPU only, always
  through the fused kernel (cpu_quant.GgufRows); gguf-py's dequantize is the reference.
- bf16 (BF16_WEIGHTS): not a quantization but a bf16 checkpoint's weights as stored, in a model that computes in
  float32 (quant/bf16_weights.py decides when): the kernel widens them as it reads them (cpu_quant.Bf16Rows), exact.
- On a CPU, decode steps run through the fused kernels (cpu_quant, csrc/quant_cpu.cpp) where they are built (int8:
  where torch's int8 kernel does not serve): the codes are decoded inside the GEMM, a few rows of W at a time,
  never as a whole weight (KERNEL_MAX_ROWS says which calls; batch-invariant, all of them).
Reference for every path: F.linear(x, dequantize(), bias), tested in tests/test_quant.py and tests/test_quant_kernels.py.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models.batch import ForwardBatch
from loraplex.models.layers import Linear, dense_linear, dense_tiling, layer_index
from loraplex.models.row_tiles import WHOLE, Tiling, invariant_tiling, tiled
from loraplex.quant import cpu_quant

METHODS = ("nf4", "fp4", "int8")  # by bitsandbytes, at load; "gguf" comes from a file (of_gguf)
BLOCKSIZE = 64
# The fused kernels serve calls of up to this many rows (decode steps), where they read the codes instead of a
# dequantized copy; longer calls (prefill) dequantize and run the dense GEMM, faster there (oneDNN's AMX and
# blocked kernels). Batch-invariant, the kernel serves every call: one order for every row count.
KERNEL_MAX_ROWS = 16
# bf16 weights: the kernel beat widening the weight for F.linear in fp32 up to 128 rows (the four decoder linears of
# the default model, 2 threads, an EPYC capped to AVX2: 9.8 against 11.2 ms at 128 rows, 37 against 28 at 512).
BF16_KERNEL_MAX_ROWS = 128
BF16_WEIGHTS = "bf16"  # the method of a bf16 checkpoint's weights kept as stored


@functools.cache
def _int8pack_mm_ok() -> bool:
    """torch's weight-only int8 CPU kernel exists and agrees with dequantize-then-matmul on a probe."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        w = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
        s = torch.rand(16).to(torch.bfloat16)
        x = torch.randn(3, 64).to(torch.bfloat16)
        ref = F.linear(x.float(), w.float() * s.float()[:, None])
        return bool(torch.allclose(torch._weight_int8pack_mm(x, w, s).float(), ref, rtol=2e-2, atol=2e-1))
    except (RuntimeError, NotImplementedError):
        return False


class QuantLinear(nn.Module):
    def __init__(self, base: Linear, method: str, double_quant: bool = False,
                 gguf: list[cpu_quant.GgufRows] | None = None) -> None:
        super().__init__()
        if method not in (*METHODS, BF16_WEIGHTS) and not (method == "gguf" and gguf is not None):
            raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
        self.method = method
        self.double_quant = double_quant and method in ("nf4", "fp4")
        self.parts = base.parts
        self.in_features = base.in_features
        self.out_features = base.out_features
        w = base.weight.detach()
        self.dtype = w.dtype  # activations and outputs stay in the model dtype
        self.bias = base.bias
        self.states: list[object] = []  # 4-bit: bitsandbytes QuantState per part (scales, nested scales)
        self.tiling: Tiling | None = None  # batch-invariant: how calls are cut into row tiles; None: not cut
        self.kernel_max_rows = KERNEL_MAX_ROWS  # calls of more rows dequantize (a GGUF LM head: never)
        # On a CPU, the fused kernels' view of the codes: each 4-bit part's, or the int8 matrix
        self.kernel_parts: list[cpu_quant.Codes | cpu_quant.Int8Rows | cpu_quant.GgufRows] | None = None
        self.gguf_parts: list[cpu_quant.GgufRows] = []  # gguf: each part's blocks
        if gguf is not None:
            if [(p.n, p.k) for p in gguf] != [(size, self.in_features) for _, size in self.parts]:
                raise ValueError(f"GGUF parts {[(p.n, p.k) for p in gguf]} do not match the layer's parts "
                                 f"{[(size, self.in_features) for _, size in self.parts]}")
            self.gguf_parts = list(gguf)
            for i, part in enumerate(gguf):  # buffers too, as a module's tensors are seen (CPU only: never moved)
                self.register_buffer(f"gguf_{i}", part.data, persistent=False)
        elif method == BF16_WEIGHTS:
            self.register_buffer("bf16_weight", w.to(torch.bfloat16).contiguous(), persistent=False)  # [OUT, IN]
            self.kernel_max_rows = BF16_KERNEL_MAX_ROWS
        elif method == "int8":
            import bitsandbytes.functional as bnbf

            cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16 if w.device.type == "cuda" else w.dtype))
            self.register_buffer("int8_weight", cb, persistent=False)  # [OUT, IN] int8
            self.register_buffer("int8_scale", (scb.float() / 127.0).to(self.dtype), persistent=False)  # [OUT]
        else:
            import bitsandbytes.functional as bnbf

            start = 0
            for _, size in self.parts:
                codes, state = bnbf.quantize_4bit(w[start : start + size].contiguous(), blocksize=BLOCKSIZE,
                                                  compress_statistics=self.double_quant, quant_type=method,
                                                  quant_storage=torch.uint8)
                self.register_buffer(f"codes_{len(self.states)}", codes, persistent=False)  # packed uint8
                self.states.append(state)
                start += size

    @classmethod
    def of_gguf(cls, base: Linear, parts: list[cpu_quant.GgufRows]) -> QuantLinear:
        """`base`'s parts as a GGUF file ships them, one GgufRows a part (quant/gguf.py)."""
        return cls(base, "gguf", gguf=parts)

    @property
    def codes(self) -> list[torch.Tensor]:
        return [getattr(self, f"codes_{i}") for i in range(len(self.states))]

    def dequantize(self) -> torch.Tensor:
        """The weight [OUT, IN] in the model dtype, as the quantized codes represent it."""
        if self.method == BF16_WEIGHTS:
            return self.bf16_weight.to(self.dtype)  # exact widening (or the stored bits)
        if self.method == "int8":
            return (self.int8_weight.to(torch.float32) * self.int8_scale.float()[:, None]).to(self.dtype)
        if self.method == "gguf" and cpu_quant.library() is not None:  # the kernel's decoder: gguf-py's bits, in C
            return torch.cat([cpu_quant.dequantize(p, self.dtype) for p in self.gguf_parts])
        if self.method == "gguf":  # gguf-py's dequantize, as transformers loads the file, rows in the model's order
            from gguf import GGMLQuantizationType, quants

            ws = [torch.from_numpy(quants.dequantize(p.data.numpy(), GGMLQuantizationType(p.type)))
                  for p in self.gguf_parts]
            return torch.cat([w if p.rows is None else w[p.rows] for w, p in zip(ws, self.gguf_parts)]).to(self.dtype)
        import bitsandbytes.functional as bnbf

        ws = []
        for codes, state in zip(self.codes, self.states):
            if state.absmax.device != codes.device:  # type: ignore[attr-defined]  # the module moved devices
                state.to(codes.device)  # type: ignore[attr-defined]
            ws.append(bnbf.dequantize_4bit(codes, state).to(self.dtype))
        return ws[0] if len(ws) == 1 else torch.cat(ws)

    def prepack(self, batch_invariant: bool = False) -> bool:
        """Nothing to pack: the codes stay as bitsandbytes holds them. On a CPU with the fused kernels (cpu_quant):
        their view of the codes, batch-invariant by construction. Elsewhere, with `batch_invariant`
        (CPU only), calls are cut into row tiles whose results do not depend on the other rows, found for this
        layer's kernel."""
        device = self._held().device
        # int8 in bf16: torch's weight-only int8 kernel is faster than ours there (docs/quantization.md)
        if self.kernel_parts is None and cpu_quant.supported(self.dtype, device) and not self._int8pack(self.dtype,
                                                                                                         device):
            self.kernel_parts = [cpu_quant.Codes.of(c, s) for c, s in zip(self.codes, self.states)] if self.states \
                else list(self.gguf_parts) if self.gguf_parts \
                else [cpu_quant.Bf16Rows(self.bf16_weight)] if self.method == BF16_WEIGHTS \
                else [cpu_quant.Int8Rows(self.int8_weight.contiguous(), self.int8_scale.contiguous())]
        if batch_invariant and self.tiling is None and self.kernel_parts is not None:
            self.tiling = WHOLE
        elif batch_invariant and self.tiling is None and device.type == "cpu":
            self.tiling = invariant_tiling(self._int8_rows, "int8pack", self.out_features, self.in_features,
                                           self.dtype) if self._int8pack(self.dtype, device) \
                else dense_tiling(self.dequantize())  # a dense GEMM on the dequantized weight
        return False

    def _held(self) -> torch.Tensor:
        """One tensor of the stored weight: where it lives."""
        return self.codes[0] if self.states else self.gguf_parts[0].data if self.gguf_parts \
            else self.bf16_weight if self.method == BF16_WEIGHTS else self.int8_weight

    def _int8pack(self, dtype: torch.dtype, device: torch.device) -> bool:
        return self.method == "int8" and device.type == "cpu" and dtype == self.dtype == torch.bfloat16 \
            and _int8pack_mm_ok()

    def _int8_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """torch's weight-only int8 kernel on rows [M, IN] -> [M, OUT], bias excluded."""
        return torch._weight_int8pack_mm(rows.contiguous(), self.int8_weight, self.int8_scale)

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        if self.kernel_parts is not None and x.dtype == self.dtype and (
                self.tiling is WHOLE or x.numel() <= self.kernel_max_rows * self.in_features):
            return self._fused(x)
        if self._int8pack(x.dtype, x.device):
            rows = x.reshape(-1, self.in_features)
            y = (self._int8_rows(rows) if self.tiling is None else tiled(rows, self._int8_rows, self.tiling))
            y = y.view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return dense_linear(x, self.dequantize(), self.bias, tiling=self.tiling)  # dequantized once per call

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """The fused kernel, part by part into its columns of one output."""
        assert self.kernel_parts is not None
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
        col = 0
        for part in self.kernel_parts:
            cpu_quant.linear(rows, part, None if self.bias is None else self.bias[col:col + part.n], out, col)
            col += part.n
        return out.view(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        """Bytes held for the weight: codes, scales and nested scales (not the bias)."""
        if self.method == BF16_WEIGHTS:
            return self.bf16_weight.nbytes
        if self.method == "int8":
            return self.int8_weight.nbytes + self.int8_scale.nbytes
        if self.method == "gguf":
            return sum(p.data.nbytes + (0 if p.rows is None else p.rows.nbytes) for p in self.gguf_parts)
        total = 0
        for codes, state in zip(self.codes, self.states):
            total += codes.nbytes + state.absmax.nbytes + state.code.nbytes  # type: ignore[attr-defined]
            if state.nested:  # type: ignore[attr-defined]
                nested = state.state2  # type: ignore[attr-defined]
                total += nested.absmax.nbytes + nested.code.nbytes + 4  # + the fp32 offset
        return total


def quantize_model(model: nn.Module, method: str, double_quant: bool = False) -> tuple[int, int]:
    """Replace every decoder-layer Linear of `model` by a QuantLinear (embeddings and the LM head stay in the
    model dtype, as in transformers' bitsandbytes loading). Returns (bytes before, bytes after) of those layers."""
    before = after = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear) or layer_index(name) is None:
            continue
        q = QuantLinear(module, method, double_quant)
        before += module.weight.nbytes
        after += q.nbytes()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return before, after
