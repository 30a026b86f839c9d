"""The custom LLM server for Agora's Conversational AI Engine, as an importable package."""

__version__ = "0.3.0"
