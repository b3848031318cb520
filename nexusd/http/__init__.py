"""The OpenAI-compatible HTTP API and the live dashboard (hypercorn on trio, one ASGI app)."""
