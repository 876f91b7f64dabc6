"""`python -m loraplex.entrypoints.openai.api_server`: vLLM's module path of the OpenAI server."""
