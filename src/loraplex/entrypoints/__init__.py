"""vLLM's module entry points under loraplex's name (vllm.entrypoints.* -> loraplex.entrypoints.*)."""
