"""One log format for every line of ours, in every worker: time, level, request id."""

import logging

from custom_llm_server.core.context import logged_request_id

log = logging.getLogger("custom_llm")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = logged_request_id()
        return True


def configure_logging(level: str) -> None:
    """One format for every line of ours, in every worker: time, level, request id.

    Idempotent, and on our own logger only, so an embedding app's logging is left alone."""
    logger = logging.getLogger("custom_llm")
    logger.setLevel(level)
    if not any(getattr(handler, "custom_llm", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.custom_llm = True  # type: ignore[attr-defined]
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
        logger.addHandler(handler)
