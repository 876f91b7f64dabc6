"""Quantized base weights (bitsandbytes NF4/FP4, int8) swapped in for the model's Linear layers."""
