"""A TCP fault proxy for the end-to-end tests (standard library only).

`FaultProxy(target_port)` listens on a free loopback port and forwards every
connection to 127.0.0.1:target_port (a redis-server in the tests), on an asyncio
loop in a daemon thread. From the test thread it can, at any time:

  set_latency(up=1.0, down=1.0)  delay every chunk by `up` s on its way to the target
                                 and `down` s on its way back (order is kept; chunks
                                 are not serialised behind each other's delays, so
                                 the bandwidth stays, only the latency grows)
  cut("reset")                   reset (RST) every open connection and refuse new ones
                                 (the listening socket is closed: ECONNREFUSED)
  cut("blackhole")               a partition: open connections stay open but go
                                 silent (bytes are read and dropped, both ways); new
                                 connections are accepted and never forwarded
  restore()                      forward again; connections blackholed meanwhile are
                                 reset (their bytes are gone, as after a TCP timeout)
  restore(reset_blackholed=False)  forward new connections again, but leave the
                                 blackholed ones silent for good (a peer that vanished)

`stats()` counts connections. As a script, `python fault_proxy.py TARGET_PORT
[LISTEN_PORT]` runs a plain proxy until interrupted (handy to poke at by hand).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import threading
import time

CHUNK = 65536
MODES = ("reset", "blackhole")


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN."""
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class _Conn:
    def __init__(self, proxy: "FaultProxy", client_w: asyncio.StreamWriter):
        self.proxy = proxy
        self.client_w = client_w
        self.server_w: asyncio.StreamWriter | None = None
        self.blackholed = False
        self.tasks: list[asyncio.Task] = []
        self.closed = False

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in self.tasks:
            t.cancel()
        for w in (self.client_w, self.server_w):
            if w is not None:
                _rst(w)
        self.proxy._conns.discard(self)

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        """reader -> (delay) -> writer; a second task writes so delays overlap."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def write() -> None:
            while True:
                due, data = await queue.get()
                if data is None:
                    writer.write_eof() if writer.can_write_eof() else None
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.blackholed:
                    continue
                writer.write(data)
                await writer.drain()

        wtask = asyncio.ensure_future(write())
        self.tasks.append(wtask)
        try:
            while True:
                data = await reader.read(CHUNK)
                if self.blackholed:
                    if not data:
                        return
                    continue  # dropped on the floor
                delay = self.proxy._latency[0 if up else 1]
                queue.put_nowait((loop.time() + delay, data or None))
                if not data:
                    break
            await wtask
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not wtask.done():
                wtask.cancel()
        # One side finished: when both have, the connection is over.
        if all(t.done() or t is asyncio.current_task() for t in self.tasks):
            self.reset()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", listen_port: int | None = None):
        self.target = (target_host, target_port)
        self.port = listen_port or _free_port()
        self._latency = (0.0, 0.0)
        self._mode: str | None = None  # None = healthy
        self._conns: set[_Conn] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fault-proxy-{self.port}", daemon=True)
        self.accepted = 0
        self.refused_or_blackholed = 0

    # -- public, called from the test thread --------------------------------
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "FaultProxy":
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def set_latency(self, up: float = 0.0, down: float = 0.0) -> None:
        """Extra delay per chunk, client->target (`up`) and target->client (`down`)."""
        self._latency = (float(up), float(down))

    def cut(self, mode: str = "reset") -> None:
        assert mode in MODES, mode
        self._call(self._cut(mode))

    def restore(self, reset_blackholed: bool = True) -> None:
        """Forward new connections again. Connections blackholed meanwhile are reset,
        unless `reset_blackholed=False`: then they stay silent for good (a peer that
        vanished without a RST, e.g. a Redis pod gone with its IP) and only the client's
        own timeouts can get it off them."""
        self._call(self._restore(reset_blackholed))

    @property
    def mode(self) -> str | None:
        return self._mode

    def stats(self) -> dict:
        return {
            "accepted": self.accepted,
            "open": len(self._conns),
            "refused_or_blackholed": self.refused_or_blackholed,
            "mode": self._mode,
            "latency": self._latency,
        }

    # -- loop side ------------------------------------------------------------
    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for c in list(self._conns):
            c.reset()

    async def _cut(self, mode: str) -> None:
        self._mode = mode
        if mode == "reset":
            if self._server is not None:
                self._server.close()  # new connections: ECONNREFUSED
                self._server = None
            for c in list(self._conns):
                c.reset()
        else:
            for c in list(self._conns):
                c.blackholed = True

    async def _restore(self, reset_blackholed: bool) -> None:
        self._mode = None
        for c in list(self._conns):
            if c.blackholed and reset_blackholed:
                c.reset()
        if self._server is None:
            await self._listen()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Conn(self, writer)
        self._conns.add(conn)
        if self._mode is not None:
            # reset: only a race with the listener closing; blackhole: accept, never forward
            self.refused_or_blackholed += 1
            if self._mode == "reset":
                conn.reset()
                return
            conn.blackholed = True
            try:
                while await reader.read(CHUNK):
                    pass
            except (ConnectionError, OSError):
                pass
            conn.reset()
            return
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            conn.reset()
            return
        conn.server_w = sw
        for s in (writer, sw):
            sock = s.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if conn.closed:  # cut while connecting
            _rst(sw)
            return
        conn.tasks.append(asyncio.ensure_future(conn.pump(reader, sw, up=True)))
        conn.tasks.append(asyncio.ensure_future(conn.pump(sr, writer, up=False)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: fault_proxy.py TARGET_PORT [LISTEN_PORT]")
    p = FaultProxy(int(sys.argv[1]), listen_port=int(sys.argv[2]) if len(sys.argv) == 3 else None).start()
    print(f"forwarding 127.0.0.1:{p.port} -> 127.0.0.1:{sys.argv[1]}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        p.stop()
