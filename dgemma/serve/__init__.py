"""The OpenAI-compatible server: `app` (HTTP) over `worker` (the engine thread)."""
