"""The demo tenants: write their datasets, train their adapters once (cached), hand back the directories."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from loraplex.models.loader import cache_dir, resolve_model
from loraplex.training.demo_data import TENANTS
from loraplex.training.trainer import TrainConfig, train

log = logging.getLogger(__name__)

# Small and quick: about 20-30 optimizer steps per tenant on 2 CPU cores.
DEMO_TRAINING = dict(rank=16, alpha=32.0, dropout=0.0, epochs=3, lr=2e-3, batch_size=8, max_length=256, seed=0)


def write_datasets(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, build in TENANTS.items():
        path = root / f"{name}.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in build())
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        paths[name] = path
    return paths


def ensure_demo_tenants(progress: bool = True) -> dict[str, Path]:
    """Train every demo tenant not yet cached for this dataset, recipe and base model; return name -> adapter dir."""
    base = resolve_model(None)
    root = cache_dir() / "tenants"
    data = write_datasets(root / "data")
    adapters = {}
    for name, path in data.items():
        key = hashlib.sha256(path.read_bytes() + json.dumps(DEMO_TRAINING, sort_keys=True).encode()
                             + str(base.name).encode()).hexdigest()[:12]
        out = root / f"{name}-{key}"
        if not (out / "adapter_model.safetensors").is_file():
            if progress:
                print(f"training demo tenant '{name}' on {path.name} (first run only)", flush=True)
            train(TrainConfig(data=path, output=out, overwrite=True, progress=progress, **DEMO_TRAINING))  # type: ignore[arg-type]
        adapters[name] = out
    return adapters
