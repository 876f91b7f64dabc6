"""Peer systems measured on the same workload as loraplex. Each script runs under its peer's own virtual
environment (e.g. `make vllm-venv`, then `.venv-vllm/bin/python benchmarks/peers/vllm_offline.py ...`) and
therefore imports only the standard library and that peer: never loraplex or benchmarks.common."""
