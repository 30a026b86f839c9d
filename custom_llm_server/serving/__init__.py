"""Serving HTTP: error answers, reading requests, SSE and byte streams, auth, the request log, the
protocol guard, several workers. Imports only the core."""
