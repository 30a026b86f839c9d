"""Several worker processes that agree: uvicorn's supervisor, with a reload that reaches every worker.

uvicorn answers SIGHUP by replacing each worker with a new process and gives each replacement a few
seconds to be ready; a worker that indexes a knowledge base or loads dictionaries can take longer, and
then the old one stays while the others move on (a split). Here the supervisor passes SIGHUP on to
every worker instead, and each reloads AGENTS_FILE itself (config/agents.py): no process is replaced,
so none can be left behind, and a reload that fails is logged by the worker with its reason.

The workers share one Prometheus folder (PROMETHEUS_MULTIPROC_DIR), made here and removed at exit.
"""

import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from uvicorn import Config
from uvicorn.supervisors.multiprocess import Multiprocess

log = logging.getLogger("custom_llm")


class Workers(Multiprocess):
    """uvicorn's supervisor; SIGHUP is passed on to the workers, which reload in place."""

    def handle_hup(self) -> None:
        log.info("SIGHUP: every worker reloads AGENTS_FILE")
        for process in self.processes:
            if process.pid is not None and process.process.is_alive():
                os.kill(process.pid, signal.SIGHUP)


@contextmanager
def shared_metrics() -> Iterator[None]:
    """A folder for the workers' metrics (unless PROMETHEUS_MULTIPROC_DIR names one), removed at exit."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    folder = tempfile.mkdtemp(prefix="custom-llm-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        yield
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(folder, ignore_errors=True)


def run_workers(config: Config) -> None:
    """Serve `config.app` (an import string) in config.workers processes until SIGTERM or SIGINT."""
    with shared_metrics():
        socket = config.bind_socket()
        try:
            Workers(config, sockets=[socket]).run()
        finally:
            socket.close()
