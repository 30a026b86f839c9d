"""The upstream LLM client, the answer loop and the server's tools."""
