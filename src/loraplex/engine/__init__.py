"""The engine: request state, KV blocks, scheduler, the model build pipeline, model runner, sync and async
engines (the async one is the HTTP server's whole API)."""
