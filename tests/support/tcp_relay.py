"""A TCP relay in front of a real service that a test takes down, brings back, or cuts mid-upload.

Not a mock: every byte goes to the real server (SeaweedFS in the job tests); the relay only plays
the network or the server going away, which a stopped process cannot do selectively.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from tests.support.procs import free_port


class TcpRelay:
    """Relays 127.0.0.1:``port`` to ``target`` (``http://host:port``) until told to fail."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port.rstrip("/")))
        self.port = free_port()
        self.up = True
        self.budget: int | None = None  # client->store bytes still allowed, None: unlimited
        self.stall_when_spent = False  # past the budget: hold the bytes (a silent store), not drop them
        self.stalled = False
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        """Every open connection dropped; new ones closed at once (a store that is stopped)."""
        with self._lock:
            self.up = False
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def restore(self) -> None:
        with self._lock:
            self.up, self.budget, self.stalled = True, None, False

    def cut_after(self, budget: int, *, stall: bool = False) -> None:
        """Go down (or, with ``stall``, go silent) once ``budget`` more bytes went from the client."""
        with self._lock:
            self.budget, self.stall_when_spent = budget, stall

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, server}
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while data := src.recv(65536):
                if upload and self.budget is not None:
                    with self._lock:
                        self.budget -= len(data)
                        over = self.budget < 0
                    if over and self.stall_when_spent:
                        self.stalled = True
                    elif over:
                        self.down()
                        return
                while upload and self.stalled:
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        self.down()
