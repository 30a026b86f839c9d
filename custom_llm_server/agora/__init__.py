"""Agora's engine as this server meets it: its fields, the history as heard, its REST API, the checker."""
