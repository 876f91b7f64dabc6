"""Adapters: names and versions (key, registry), PEFT-format loading and validation, the host tier and the
device slots, all owned by manager.AdapterManager."""
