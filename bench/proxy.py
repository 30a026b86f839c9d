"""A TCP relay the bench and the tests put in front of a service (PostgreSQL, Redis) to cut and
restore it: the service out of reach, as a replica sees a network fault or a restart."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    """Relays 127.0.0.1:<port> to `target` until cut(); refuses new connections until open.set()."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.listener = target, socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open, self.pairs = threading.Event(), []
        self.open.set()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if not self.open.is_set():
                client.close()
                continue
            server = socket.create_connection(self.target)
            self.pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open.clear()
        for pair in self.pairs:
            for end in pair:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
        self.pairs.clear()
