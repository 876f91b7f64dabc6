"""Training LoRA/QLoRA adapters with PEFT, merging a hot tenant's adapter, and the demo tenants."""
