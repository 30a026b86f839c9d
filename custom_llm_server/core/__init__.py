"""What every layer shares: errors, the request context, events, text, redaction, wording, bounds,
metrics. Imports nothing of ours, neither FastAPI nor uvicorn."""
