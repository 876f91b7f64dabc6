"""The engine: request state, KV blocks, scheduler, model runner, sync and async engines."""
