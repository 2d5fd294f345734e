"""OpenAI-compatible HTTP serving: `build_app(engine, ServerConfig(...))` in shoal.server.app, `shoal serve` in cli.

app (generation routes, errors), batch_routes (the Batch API), state (what routes share), serving (OpenAI
requests to engine work and back), protocol (the API objects), batch_store / batch_worker / batch_jobs.
"""
