"""An OpenAI-compatible HTTP front for djinnd: a separate process and a plain libdjinn client.

`djinn-openai --listen 127.0.0.1:8000` serves /v1/chat/completions, /v1/completions, /v1/models,
/metrics and /health. See libdjinn/openai/app.py for the routes.
"""
