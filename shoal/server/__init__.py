"""OpenAI-compatible HTTP serving: `build_app(engine, ServerConfig(...))` in shoal.server.app, `shoal serve` in cli."""
