"""dtype "auto" is resolved from the hardware: bf16 only where it is native (AVX512-BF16 or AMX on CPUs, sm80+
on GPUs), else float32 on CPUs and fp16 on GPUs; torch's own caps (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) are
honoured; an explicit bf16 on a CPU that emulates it runs, with a warning that names the measured slowdown."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from loraplex import hardware
from loraplex.errors import InvalidRequestError
from loraplex.hardware import CpuInfo, resolve_dtype

ZEN4 = CpuInfo(model="AMD EPYC", arch="x86_64", capability="AVX512", onednn_max_isa=None,
               flags=frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"}))
ZEN3 = dataclasses.replace(ZEN4, capability="AVX2", flags=frozenset({"avx2", "fma"}))
SKYLAKE_X = dataclasses.replace(ZEN4, flags=frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}))
SAPPHIRE_RAPIDS = dataclasses.replace(ZEN4, flags=ZEN4.flags | {"amx_bf16", "amx_tile", "avx512_fp16"})


@pytest.fixture
def on(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Pretend to run on a given CPU (torch's own oneDNN probe says yes: these CPUs all have AVX-512 or AVX2)."""
    monkeypatch.setattr(hardware, "_mkldnn_bf16", lambda: True)

    def use(info: CpuInfo) -> None:
        monkeypatch.setattr(hardware, "cpu", lambda: info)

    return use


@pytest.mark.parametrize(("info", "dtype", "cls"), [
    (ZEN4, torch.bfloat16, "AVX512-BF16"), (SAPPHIRE_RAPIDS, torch.bfloat16, "AMX-BF16"),
    (ZEN3, torch.float32, "AVX2"), (SKYLAKE_X, torch.float32, "AVX512"),
    # an AVX-512 BF16 CPU with torch capped to AVX2 (how this project approximates an AVX2 machine)
    (dataclasses.replace(ZEN4, capability="AVX2"), torch.float32, "AVX2"),
    (dataclasses.replace(ZEN4, onednn_max_isa="AVX2"), torch.float32, "AVX512"),
    (dataclasses.replace(ZEN4, onednn_max_isa="avx512_core_bf16"), torch.bfloat16, "AVX512-BF16"),
])
def test_auto_on_cpus(on, info: CpuInfo, dtype: torch.dtype, cls: str) -> None:  # type: ignore[no-untyped-def]
    on(info)
    choice = resolve_dtype("auto", "cpu")
    assert choice.dtype == dtype and choice.native and info.cpu_class == cls
    assert cls in choice.reason and choice.describe().startswith(f"dtype auto -> {choice.name}")


def test_explicit_dtypes(on) -> None:  # type: ignore[no-untyped-def]
    on(ZEN3)
    assert resolve_dtype("float32").native
    bf16 = resolve_dtype("bfloat16")
    assert bf16.dtype == torch.bfloat16 and not bf16.native and "emulated" in bf16.reason
    assert not resolve_dtype("float16").native
    on(SAPPHIRE_RAPIDS)
    assert resolve_dtype("bfloat16").native and resolve_dtype("float16").native
    with pytest.raises(InvalidRequestError, match="dtype must be one of auto, bfloat16, float16, float32"):
        resolve_dtype("int4")


def test_emulated_bf16_warns_with_the_measured_slowdown(on, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    on(ZEN3)
    with caplog.at_level(logging.WARNING):
        hardware.warn_if_emulated(resolve_dtype("bfloat16"))
    assert "dtype bfloat16 on AMD EPYC (AVX2) is emulated: a decode-shaped matmul measured" in caplog.text
    assert "slower than float32 here" in caplog.text
    caplog.clear()
    hardware.warn_if_emulated(resolve_dtype("float32"))
    assert not caplog.text


@pytest.mark.parametrize(("capability", "dtype"), [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                   ((7, 5), torch.float16)])
def test_auto_on_gpus(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], dtype: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    choice = resolve_dtype("auto", "cuda")
    assert choice.dtype == dtype and f"sm{capability[0]}{capability[1]}" in choice.reason


def test_the_engine_and_training_follow_the_rule(on, default_model_dir) -> None:  # type: ignore[no-untyped-def]
    """On an AVX2 CPU the engine runs float32 and says why; the prepacked linears follow the dtype."""
    from loraplex import LLM
    from loraplex.models.layers import Linear

    on(ZEN3)
    llm = LLM(max_model_len=64, kv_cache_memory=8 << 20, enable_lora=False)
    assert llm.engine.runner.dtype == torch.float32
    assert llm.engine.facts.dtype_reason == "dtype auto -> float32: this CPU has no native bf16 (AVX2)"
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None for m in linears)  # oneDNN fp32 prepacked


def test_this_machine_is_described() -> None:
    """What `make test` prints at the top: the real CPU's class and the dtype auto picks here."""
    info = hardware.cpu()
    assert info.cpu_class in info.describe() and info.model in info.describe()
    assert resolve_dtype().dtype == (torch.bfloat16 if info.native_bf16 else torch.float32)
