"""The fused quantized linear CPU kernels (csrc/quant_cpu.cpp): NF4 and FP4 on bitsandbytes' own codes and block
scales (double quantization included), int8 with per-row scales, and GGUF's Q4_0, Q4_1 and Q8_0 blocks as shipped,
decoded inside the GEMM a few rows of W at a time, never as a whole weight. Built once per machine
(loraplex.native), called through ctypes. Without a C++ compiler, or with LORAPLEX_QUANT_KERNEL=torch, QuantLinear
dequantizes the weight and calls F.linear (its reference); tests/test_quant_kernels.py holds the two equal.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex import native

SOURCE = Path(__file__).with_name("csrc") / "quant_cpu.cpp"
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtype codes


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # loaded after torch: its OpenMP is torch's (same soname)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.loraplex_q4_linear.argtypes = [ctypes.c_int, p, i64, i64, i64, p, p, p, p, p, p, ctypes.c_float, i64, i64,
                                       p, p, i64, ctypes.c_int]
    lib.loraplex_q4_dequantize.argtypes = [ctypes.c_int, i64, i64, p, p, p, p, p, p, ctypes.c_float, i64, i64, p]
    lib.loraplex_q8_linear.argtypes = [ctypes.c_int, p, i64, i64, i64, p, p, p, p, i64, ctypes.c_int]
    lib.loraplex_q8_dequantize.argtypes = [ctypes.c_int, i64, i64, p, p, p]
    lib.loraplex_gguf_linear.argtypes = [ctypes.c_int, p, i64, i64, i64, ctypes.c_int, p, i64, p, p, p, i64,
                                         ctypes.c_int]
    lib.loraplex_gguf_dequantize.argtypes = [ctypes.c_int, i64, i64, ctypes.c_int, p, i64, p, p, ctypes.c_int]
    lib.loraplex_bf16_linear.argtypes = [ctypes.c_int, p, i64, i64, i64, p, p, p, i64, ctypes.c_int]
    for fn in (lib.loraplex_q4_linear, lib.loraplex_q4_dequantize, lib.loraplex_q8_linear, lib.loraplex_q8_dequantize,
               lib.loraplex_gguf_linear, lib.loraplex_gguf_dequantize, lib.loraplex_bf16_linear):
        fn.restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (dequantize-then-F.linear serves) with the reason logged once."""
    return native.load_or_none(SOURCE, load, "the fused quantized linear kernels", "dequantize-then-GEMM",
                               "LORAPLEX_QUANT_KERNEL")


def supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and dtype in DTYPES and library() is not None


@dataclass(frozen=True, slots=True)
class Codes:
    """One [N, K] matrix's 4-bit codes and scales, as the kernel reads them (from a bitsandbytes QuantState)."""

    codes: torch.Tensor  # [ceil(N*K/2)] uint8
    table: torch.Tensor  # [16] fp32
    absmax: torch.Tensor  # [blocks] fp32, or uint8 with double quantization
    absmax2: torch.Tensor | None  # nested: [blocks / bs2] fp32
    code2: torch.Tensor | None  # nested: [256] fp32
    offset: float
    blocksize: int
    blocksize2: int
    n: int
    k: int
    # The kernel's weight arguments (pointers and sizes), checked and taken once: a decode step calls the kernel
    # 210 times on the default model, and checking the weight at every call cost about a third of its overhead.
    args: tuple[int | float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nested = self.absmax2 is not None
        blocks = -(-self.n * self.k // self.blocksize) if self.blocksize > 0 else -1
        ok = (self.codes.dtype == torch.uint8 and self.codes.is_contiguous() and self.codes.dim() == 1
              and self.codes.numel() == -(-self.n * self.k // 2) and self.table.dtype == torch.float32
              and self.table.shape == (16,) and self.table.is_contiguous() and self.absmax.is_contiguous()
              and self.absmax.shape == (blocks,) and self.absmax.dtype == (torch.uint8 if nested else torch.float32)
              and (not nested or (self.code2 is not None and self.code2.shape == (256,) and self.blocksize2 > 0
                                  and self.absmax2.shape == (-(-blocks // self.blocksize2),)  # type: ignore[union-attr]
                                  and self.absmax2.dtype == self.code2.dtype == torch.float32  # type: ignore[union-attr]
                                  and self.absmax2.is_contiguous() and self.code2.is_contiguous()))  # type: ignore[union-attr]
              and all(t.device.type == "cpu" for t in (self.codes, self.table, self.absmax)))
        if not ok:
            raise ValueError(f"4-bit codes for [{self.n}, {self.k}]: codes [{-(-self.n * self.k // 2)}] uint8, table "
                             f"[16] float32, absmax [{blocks}] (float32, or uint8 with nested scales), contiguous on "
                             f"the CPU; got codes {tuple(self.codes.shape)} {self.codes.dtype}, absmax "
                             f"{tuple(self.absmax.shape)} {self.absmax.dtype}")
        scales = (0, self.absmax.data_ptr(), self.absmax2.data_ptr(), self.code2.data_ptr()) if nested \
            else (self.absmax.data_ptr(), 0, 0, 0)  # type: ignore[union-attr]
        object.__setattr__(self, "args", (self.codes.data_ptr(), self.table.data_ptr(), *scales, self.offset,
                                          self.blocksize, self.blocksize2))

    @staticmethod
    def of(codes: torch.Tensor, state: object) -> Codes:
        s: object = state
        n, k = s.shape  # type: ignore[attr-defined]
        nested = bool(s.nested)  # type: ignore[attr-defined]
        s2 = s.state2 if nested else None  # type: ignore[attr-defined]
        return Codes(codes.contiguous().view(-1), s.code.float().contiguous(),  # type: ignore[attr-defined]
                     s.absmax.contiguous(), s2.absmax.float().contiguous() if s2 else None,  # type: ignore[attr-defined]
                     s2.code.float().contiguous() if s2 else None,  # type: ignore[attr-defined]
                     float(s.offset) if nested else 0.0, int(s.blocksize),  # type: ignore[attr-defined]
                     int(s2.blocksize) if s2 else 1, int(n), int(k))


@dataclass(frozen=True, slots=True)
class Int8Rows:
    """One [N, K] int8 matrix with a scale per output row, as the kernel reads it (QuantLinear's int8 buffers)."""

    codes: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] in the model dtype

    def __post_init__(self) -> None:
        if not (self.codes.dtype == torch.int8 and self.codes.dim() == 2 and self.codes.is_contiguous()
                and self.scale.dtype in DTYPES and self.scale.shape == (self.codes.shape[0],)
                and self.scale.is_contiguous() and self.codes.device.type == self.scale.device.type == "cpu"):
            raise ValueError(f"int8 rows: codes [N, K] int8 and scale [N] (float32/bfloat16), contiguous on the CPU; "
                             f"got {tuple(self.codes.shape)} {self.codes.dtype}, {tuple(self.scale.shape)} "
                             f"{self.scale.dtype}")

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def k(self) -> int:
        return int(self.codes.shape[1])


@dataclass(frozen=True, slots=True)
class Bf16Rows:
    """One [N, K] matrix stored in bf16, read by the kernel widened to fp32 (exact): a bf16 checkpoint's weights
    served as stored where the model computes in fp32 (quant/bf16_weights.py)."""

    weight: torch.Tensor  # [N, K] bf16

    def __post_init__(self) -> None:
        w = self.weight
        if not (w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous() and w.device.type == "cpu"):
            raise ValueError(f"bf16 rows: a weight [N, K] bfloat16, contiguous on the CPU; got {tuple(w.shape)} "
                             f"{w.dtype} on {w.device}")

    @property
    def n(self) -> int:
        return int(self.weight.shape[0])

    @property
    def k(self) -> int:
        return int(self.weight.shape[1])


GGUF_BLOCK = 32
GGUF_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}  # ggml type id -> bytes a block: Q4_0, Q4_1, Q8_0


@dataclass(frozen=True, slots=True)
class GgufRows:
    """One [N, K] matrix in a GGUF block format (Q4_0, Q4_1 or Q8_0), its bytes as the file ships them
    (csrc/gguf_blocks.h); output row n reads stored row rows[n] where a row map is given."""

    data: torch.Tensor  # [stored rows, K / 32 * bytes a block] uint8
    type: int  # ggml's type id
    n: int
    k: int
    rows: torch.Tensor | None = None  # [N] int64 in [0, stored rows), or None: row n is stored row n

    def __post_init__(self) -> None:
        block = GGUF_BLOCK_BYTES.get(self.type, 0)
        stored = self.data.shape[0] if self.data.dim() == 2 else -1
        ok = (block > 0 and self.k % GGUF_BLOCK == 0 and self.data.dtype == torch.uint8 and self.data.dim() == 2
              and self.data.shape[1] == self.k // GGUF_BLOCK * block and self.data.is_contiguous()
              and self.data.device.type == "cpu")
        if ok and self.rows is None:
            ok = stored == self.n
        elif ok and self.rows is not None:
            r = self.rows
            ok = (r.dtype == torch.int64 and r.shape == (self.n,) and r.is_contiguous() and r.device.type == "cpu"
                  and (self.n == 0 or (int(r.min()) >= 0 and int(r.max()) < stored)))
        if not ok:
            raise ValueError(f"GGUF rows for [{self.n}, {self.k}]: ggml type Q4_0 (2), Q4_1 (3) or Q8_0 (8), K a "
                             f"multiple of {GGUF_BLOCK}, data [rows, K / {GGUF_BLOCK} * bytes a block] uint8 "
                             f"contiguous on the CPU, a row map [N] int64 within the stored rows; got type "
                             f"{self.type}, data {tuple(self.data.shape)} {self.data.dtype}, row map "
                             f"{None if self.rows is None else tuple(self.rows.shape)}")


Weight = Codes | Int8Rows | Bf16Rows | GgufRows  # what the kernels read


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None, out: torch.Tensor, col0: int = 0) -> None:
    """out[:, col0:col0+N] = x @ W^T (+ bias), W decoded from `w` (rounded to x's dtype, as dequantize_4bit and
    QuantLinear.dequantize return it).

    x: [M, K] contiguous, fp32 or bf16; bias: [N] in x's dtype; out: [M, ldo] contiguous in x's dtype."""
    lib = library()
    if lib is None:
        raise RuntimeError("the fused quantized linear kernels are not built (cpu_quant.library() is None)")
    m, k = x.shape
    ok = (x.dtype in DTYPES and x.dtype == out.dtype and x.is_contiguous() and out.is_contiguous() and k == w.k
          and out.shape[0] == m and col0 + w.n <= out.shape[1] and x.device.type == "cpu"
          and (not isinstance(w, Int8Rows) or w.scale.dtype == x.dtype)  # the weight itself was checked when made
          and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous() and bias.shape == (w.n,))))
    if not ok:
        raise ValueError(f"quantized linear: x [M, {w.k}] and out [M, >= {col0 + w.n}] contiguous on the CPU in one dtype "
                         f"(float32/bfloat16), bias [{w.n}]; got x {tuple(x.shape)} {x.dtype}, out "
                         f"{tuple(out.shape)} {out.dtype}, bias {None if bias is None else tuple(bias.shape)}")
    ptr = out.data_ptr() + col0 * out.element_size()
    if isinstance(w, GgufRows):
        lib.loraplex_gguf_linear(DTYPES[x.dtype], x.data_ptr(), m, k, w.n, w.type, w.data.data_ptr(), w.data.shape[1],
                                 0 if w.rows is None else w.rows.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                 ptr, out.shape[1], torch.get_num_threads())
        return
    if isinstance(w, Bf16Rows):
        lib.loraplex_bf16_linear(DTYPES[x.dtype], x.data_ptr(), m, k, w.n, w.weight.data_ptr(),
                                 0 if bias is None else bias.data_ptr(), ptr, out.shape[1], torch.get_num_threads())
        return
    if isinstance(w, Int8Rows):
        lib.loraplex_q8_linear(DTYPES[x.dtype], x.data_ptr(), m, k, w.n, w.codes.data_ptr(), w.scale.data_ptr(),
                               0 if bias is None else bias.data_ptr(), ptr, out.shape[1], torch.get_num_threads())
        return
    lib.loraplex_q4_linear(DTYPES[x.dtype], x.data_ptr(), m, k, w.n, *w.args, 0 if bias is None else bias.data_ptr(),
                           ptr, out.shape[1], torch.get_num_threads())


def dequantize(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight the kernel multiplies by, in `dtype`: for the tests, and a GGUF layer's calls of more than a
    decode step's rows (split between the threads)."""
    lib = library()
    assert lib is not None and dtype in DTYPES
    if isinstance(w, Bf16Rows):
        return w.weight.to(dtype)  # widening is exact: the values the kernel reads
    out = torch.empty(w.n, w.k, dtype=torch.float32)
    if isinstance(w, GgufRows):
        lib.loraplex_gguf_dequantize(DTYPES[dtype], w.k, w.n, w.type, w.data.data_ptr(), w.data.shape[1],
                                     0 if w.rows is None else w.rows.data_ptr(), out.data_ptr(),
                                     torch.get_num_threads())
        return out.to(dtype)
    if isinstance(w, Int8Rows):
        lib.loraplex_q8_dequantize(DTYPES[dtype], w.k, w.n, w.codes.data_ptr(), w.scale.data_ptr(), out.data_ptr())
        return out.to(dtype)
    lib.loraplex_q4_dequantize(DTYPES[dtype], w.k, w.n, *w.args, out.data_ptr())
    return out.to(dtype)
