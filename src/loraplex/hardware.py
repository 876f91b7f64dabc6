"""What this machine computes fast, and the dtype `auto` means here. One rule for the whole project: the
engine, training, merge, quantization and the benchmarks all call `resolve_dtype`.

- CUDA: bf16 where the GPU multiplies it natively (sm80+), else fp16.
- CPU: bf16 only where bf16 matmul is native (AVX512-BF16 or AMX-BF16, and allowed to torch's kernels);
  else float32. Without native support bf16 is emulated, far slower than fp32 for serving and training alike
  (an explicit bf16 there is warned about with the figure measured at run time: `warn_if_emulated` below).

torch's own view is honoured, so `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` on an AVX-512 machine
resolves exactly as an AVX2-only CPU does (the way this project approximates one; the fused LoRA kernel
is then built for AVX2 too, lora/cpu_kernel.py).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from dataclasses import dataclass

import torch

from loraplex.config import DTYPES
from loraplex.errors import InvalidRequestError

log = logging.getLogger(__name__)

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still allow its native bf16 kernels; lower ones emulate bf16.
_ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                     "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                     "DEFAULT", "ALL"}


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model: str  # "AMD EPYC", from /proc/cpuinfo
    arch: str  # platform.machine(): x86_64, aarch64
    capability: str  # ATen's dispatch level ("AVX512", "AVX2", "DEFAULT", ...); honours ATEN_CPU_CAPABILITY
    flags: frozenset[str]  # /proc/cpuinfo flags
    onednn_max_isa: str | None  # ONEDNN_MAX_CPU_ISA, if set
    caps: tuple[str, ...] = ()  # the environment settings that cap torch below the CPU ("ATEN_CPU_CAPABILITY=avx2")

    @property
    def avx512(self) -> bool:
        """ATen dispatches AVX-512 kernels (the CPU has them and no override caps it below)."""
        return self.capability == "AVX512"

    def _onednn_allows_bf16(self) -> bool:
        return self.onednn_max_isa is None or self.onednn_max_isa.upper() in _ONEDNN_BF16_ISAS

    @property
    def native_bf16(self) -> bool:
        if self.arch in ("x86_64", "AMD64"):
            has = "avx512_bf16" in self.flags or "amx_bf16" in self.flags
            return has and self.avx512 and self._onednn_allows_bf16() and _mkldnn_bf16()
        return _mkldnn_bf16()  # aarch64 and others: oneDNN's own probe (Arm BF16 instructions)

    @property
    def native_fp16(self) -> bool:
        if self.arch in ("x86_64", "AMD64"):
            return ("avx512_fp16" in self.flags or "amx_fp16" in self.flags) and self.avx512
        return "fphp" in self.flags or "asimdhp" in self.flags

    @property
    def cpu_class(self) -> str:
        """What a figure or a test run should be labelled with: AMX-BF16, AVX512-BF16, AVX512, AVX2, ..."""
        if self.arch not in ("x86_64", "AMD64"):
            return f"{self.arch}{'-BF16' if self.native_bf16 else ''}"
        if self.native_bf16:
            return "AMX-BF16" if "amx_bf16" in self.flags else "AVX512-BF16"
        if self.capability == "AVX512":
            return "AVX512"
        return self.capability  # AVX2, DEFAULT

    def describe(self) -> str:
        return f"{self.model} ({self.cpu_class}{', capped by ' + ' '.join(self.caps) if self.caps else ''})"


@functools.cache
def _mkldnn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def cpu() -> CpuInfo:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first processor's lines
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = fields.get("flags") or fields.get("Features") or ""
    caps = tuple(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k))
    return CpuInfo(model=model, arch=platform.machine(), capability=torch.backends.cpu.get_cpu_capability(),
                   flags=frozenset(flags.split()), onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
                   caps=caps)


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    dtype: torch.dtype
    requested: str  # what was asked: "auto" or a dtype name
    reason: str  # why, in words, for the log, /v1/models and /metrics
    native: bool  # the device multiplies this dtype natively (False: explicit, emulated, slow)

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        return f"dtype {self.requested} -> {self.name}: {self.reason}"


def resolve_device(spec: str = "auto") -> str:
    """The torch device for `spec` (config.DEVICE_FORM): auto takes the first CUDA GPU where torch sees one, else
    the CPU; a named GPU must exist."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        index = int(spec.partition(":")[2] or 0)
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= visible:
            built = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            raise InvalidRequestError(f"device {spec!r}: torch sees {visible} CUDA device(s) ({built}); use --device "
                                      "cpu, or auto to take a GPU only where there is one")
    return spec


def resolve_dtype(name: str = "auto", device: str | torch.device = "cpu") -> DtypeChoice:
    """The model dtype for `name` ("auto" or a dtype name) on `device`, with the reason. An explicit 16-bit
    dtype the CPU only emulates is honoured, with native=False (the engine warns, naming the slowdown)."""
    if name not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        return _resolve_cuda(name, dev)
    if dev.type != "cpu":
        dtype = torch.bfloat16 if name == "auto" else getattr(torch, name)
        return DtypeChoice(dtype, name, f"device {dev.type}", True)
    info = cpu()
    if name == "auto":
        if info.native_bf16:
            return DtypeChoice(torch.bfloat16, name, f"this CPU multiplies bf16 natively ({info.cpu_class})", True)
        return DtypeChoice(torch.float32, name, f"this CPU has no native bf16 ({info.cpu_class})", True)
    dtype = getattr(torch, name)
    if dtype == torch.float32:
        return DtypeChoice(dtype, name, "requested", True)
    native = info.native_bf16 if dtype == torch.bfloat16 else info.native_fp16
    if native:
        return DtypeChoice(dtype, name, f"requested; native on this CPU ({info.cpu_class})", True)
    return DtypeChoice(dtype, name, f"requested; emulated on this CPU ({info.cpu_class}), float32 is faster", False)


def _resolve_cuda(name: str, dev: torch.device) -> DtypeChoice:
    major, minor = torch.cuda.get_device_capability(dev)
    if name != "auto":
        return DtypeChoice(getattr(torch, name), name, f"requested (sm{major}{minor})", True)
    if major >= 8:
        return DtypeChoice(torch.bfloat16, name, f"this GPU multiplies bf16 natively (sm{major}{minor})", True)
    return DtypeChoice(torch.float16, name, f"this GPU has no native bf16 (sm{major}{minor} < sm80)", True)


def emulation_slowdown(dtype: torch.dtype, shape: tuple[int, int, int] = (32, 576, 1536)) -> float:
    """How many times slower a decode-shaped matmul [M, K] x [K, N] runs in `dtype` than in float32 here
    (measured now, in a few tens of ms on a CPU that emulates it)."""
    m, k, n = shape
    times = {}
    for dt in (torch.float32, dtype):
        a, b = torch.randn(m, k).to(dt), torch.randn(k, n).to(dt)
        a @ b  # first call: kernel selection, not timed
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        times[dt] = best
    return times[dtype] / times[torch.float32]


def warn_if_emulated(choice: DtypeChoice) -> None:
    """An explicit bf16/fp16 on a CPU that emulates it runs, slowly: say so with the measured figure."""
    if choice.native:
        return
    slow = emulation_slowdown(choice.dtype)
    log.warning("dtype %s on %s is emulated: a decode-shaped matmul measured %.1fx slower than float32 here; "
                "--dtype auto (or float32) is faster on this CPU", choice.name, cpu().describe(), slow)
