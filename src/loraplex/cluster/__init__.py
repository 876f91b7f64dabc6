"""Scale-out on Ray Serve: engine replicas selected by model multiplexing (the request's adapter as the
multiplexed model id), one ingress that serves the single server's OpenAI API (server/) over them, and a
board where replicas publish their state for /metrics and /v1/models."""
