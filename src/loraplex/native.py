"""C++ kernels built on the machine that runs them: one compiler call, cached, loaded through ctypes.

The sources (lora/csrc, models/csrc, quant/csrc) use no torch headers, so a build is one call of the system's
C++ compiler taking about a second, made on first use (and by `make setup`). Builds are cached under
$LORAPLEX_CACHE/kernels by a hash of the source, the headers (csrc/ and the source's own), the flags, the compiler
and the CPU's feature flags: a cached build never runs on a CPU it was not made for. Without a compiler, or when a
build fails, the caller's torch path serves (each kernel module says which), with the reason logged once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from loraplex import hardware
from loraplex.cache import cache_dir, ensure

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC"]
INCLUDE = Path(__file__).with_name("csrc")  # simd.h, shared by every kernel


def machine_flags() -> list[str]:
    """FLAGS for this machine. Where torch's kernels are capped below AVX-512 on an AVX-512 CPU
    (ATEN_CPU_CAPABILITY=avx2: how an AVX2-only CPU is approximated), the kernels are built for AVX2 too."""
    info = hardware.cpu()
    if "avx512f" in info.flags and not info.avx512:
        return [*FLAGS, "-mno-avx512f"]
    return list(FLAGS)


def compiler() -> list[str] | None:
    """The C++ compiler command: $CXX (may carry arguments, e.g. "ccache g++"), else g++, c++ or clang++."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return [found] if found else None


def library_path(source: Path, cxx: list[str], flags: list[str]) -> Path:
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=False, timeout=60).stdout
    cpu_flags = " ".join(sorted(hardware.cpu().flags))
    headers = [h.read_text() for h in [*sorted(INCLUDE.glob("*.h")), *sorted(source.parent.glob("*.h"))]]  # shared, own
    key = hashlib.sha256("\0".join([source.read_text(), *headers, *flags, version, cpu_flags]).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"{source.stem}-{key}.so"


def build(source: Path, cxx: list[str], flags: list[str] | None = None) -> Path:
    """Compile `source` unless this machine's build is cached; return the library's path. Processes starting at
    once build it once (loraplex/cache.py); the others wait for that build and load it."""
    flags = machine_flags() if flags is None else flags
    return ensure(library_path(source, cxx, flags), Path.is_file, lambda tmp: _compile(source, cxx, flags, tmp),
                  what=f"the build of {source.name}")


def _compile(source: Path, cxx: list[str], flags: list[str], out: Path) -> None:
    proc = subprocess.run([*cxx, *flags, f"-I{INCLUDE}", str(source), "-o", str(out)], capture_output=True,
                          text=True, check=False, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cxx)} failed to build {source.name}:\n{proc.stderr[-2000:]}")
    os.chmod(out, 0o755)  # a shared cache must be readable by every user, whatever the umask of its builder


def load_or_none(source: Path, declare: Callable[[Path], ctypes.CDLL], what: str, fallback: str,
                 switch: str) -> ctypes.CDLL | None:
    """Build (or reuse) and load `source` with `declare` (which sets the functions' argtypes); None where the
    environment variable `switch` is "torch", or, with the reason logged, where there is no compiler or the
    build fails ("`what` unavailable, `fallback` serve")."""
    if os.environ.get(switch, "").lower() == "torch":
        return None
    cxx = compiler()
    if cxx is None:
        log.warning("no C++ compiler found: %s unavailable, %s serve (slower on CPU)", what, fallback)
        return None
    try:
        return declare(build(source, cxx))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("%s unavailable, %s serve: %s", what, fallback, e)
        return None
