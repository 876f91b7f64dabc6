"""The demo tenants: write their datasets, train their adapters once (cached), hand back the directories."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from loraplex.cache import cache_dir, ensure
from loraplex.models.loader import resolve_model
from loraplex.training.demo_data import TENANTS
from loraplex.training.config import TrainConfig
from loraplex.training.trainer import train

log = logging.getLogger(__name__)

# Small and quick, on any 2-core x86-64: 12-14 optimizer steps per tenant, LoRA on the upper half of the decoder
# layers (backpropagation stops there, so the lower half's backward pass is saved), so that the four tenants train
# in minutes on two cores; on their own data they score far above the base model (tests/test_training.py holds
# the recipe to the training tests' bars).
DEMO_TRAINING = dict(rank=16, alpha=32.0, dropout=0.0, epochs=2, lr=3e-3, batch_size=8, max_length=256, seed=0)


def demo_recipe(base: Path) -> dict[str, object]:
    """DEMO_TRAINING plus the layers it trains: the upper half of the base model's decoder layers."""
    from loraplex.models.config import load_model_config

    n = load_model_config(base).num_layers
    return {**DEMO_TRAINING, "layers": tuple(range(n // 2, n))}


def write_datasets(root: Path) -> dict[str, Path]:
    """Each demo tenant's dataset as JSONL under `root`, replaced whole (never truncated in place: another process
    may be training on it) and only when its text changed."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, build in TENANTS.items():
        path = root / f"{name}.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in build())
        if not path.is_file() or path.read_text() != text:
            fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{path.name}-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        paths[name] = path
    return paths


def ensure_demo_tenants(progress: bool = True) -> dict[str, Path]:
    """Train every demo tenant not yet cached for this dataset, recipe and base model, once across processes
    (loraplex/cache.py); return name -> adapter dir."""
    base = resolve_model(None)
    recipe = demo_recipe(base)
    root = cache_dir() / "tenants"
    data = write_datasets(root / "data")
    adapters = {}
    for name, path in data.items():
        key = hashlib.sha256(path.read_bytes() + json.dumps(recipe, sort_keys=True).encode()
                             + str(base.name).encode()).hexdigest()[:12]

        def make(tmp: Path, name: str = name, path: Path = path) -> None:
            if progress:
                print(f"training demo tenant '{name}' on {path.name} (first run only)", flush=True)
            train(TrainConfig(data=path, output=tmp, overwrite=True, progress=progress, **recipe))  # type: ignore[arg-type]

        adapters[name] = ensure(root / f"{name}-{key}", lambda d: (d / "adapter_model.safetensors").is_file(), make,
                                what=f"demo tenant {name!r}")
    return adapters
