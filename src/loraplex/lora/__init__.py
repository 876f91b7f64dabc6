"""Multi-LoRA: per-token adapter mapping, LoRA ops (reference + fast paths), and layer wrappers."""
