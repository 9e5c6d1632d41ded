"""Starts the real muon-server on a free loopback port for a test."""
import os
import socket
import subprocess
import tempfile
import threading
import time


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def free_port():
    """A loopback port nothing listens on (free when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *extra_flags, listen="127.0.0.1:0"):
        self._dir = tempfile.TemporaryDirectory()
        port_file = os.path.join(self._dir.name, "port")
        self.process = subprocess.Popen(
            [os.environ["MUON_SERVER_BIN"], f"--listen={listen}", f"--port_file={port_file}",
             "--metrics_listen=", "--engine=cpu", *extra_flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not _read(port_file):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("muon-server did not start: "
                                   + self.process.stderr.read().decode(errors="replace"))
            time.sleep(0.05)
        self.port = int(_read(port_file))
        self.address = f"127.0.0.1:{self.port}"

    def kill(self):
        """kill -9, as a crash would."""
        self.process.kill()
        self.stop()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stderr.close()
        self._dir.cleanup()


class CuttingProxy:
    """A TCP proxy on loopback that can cut every open connection, so a test
    breaks a real gRPC stream mid-step. New connections go through again."""

    def __init__(self, target_port):
        self._target = target_port
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open = []
        self.bytes_up = 0  # client -> server, since the last cut
        self._cut_after = None
        self.cuts = 0
        # Set: bytes flow that way (True: client -> server).
        self._flowing = {True: threading.Event(), False: threading.Event()}
        for event in self._flowing.values():
            event.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, upstream):
        """Stops forwarding one way (upstream: client -> server), keeping the
        bytes, as a stalled network does; release() sends them on."""
        self._flowing[upstream].clear()

    def release(self):
        for event in self._flowing.values():
            event.set()

    def cut_after(self, nbytes):
        """Cuts every connection once `nbytes` more bytes went client -> server."""
        with self._lock:
            self.bytes_up = 0
            self._cut_after = nbytes

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, upstream):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._flowing[upstream].wait()
                dst.sendall(data)
                if upstream:
                    with self._lock:
                        self.bytes_up += len(data)
                        cut = self._cut_after is not None and self.bytes_up >= self._cut_after
                    if cut:
                        self._cut_all()
                        return
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _cut_all(self):
        with self._lock:
            self._cut_after = None
            self.cuts += 1
            sockets, self._open = self._open, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self):
        self._listener.close()
        self._cut_all()
