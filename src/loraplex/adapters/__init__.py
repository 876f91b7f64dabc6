"""Adapters: PEFT-format loading and validation, device-slot bookkeeping."""
