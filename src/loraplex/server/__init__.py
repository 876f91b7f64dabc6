"""The OpenAI-compatible HTTP server: `loraplex serve`."""
