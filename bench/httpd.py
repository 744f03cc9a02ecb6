#!/usr/bin/env python3
"""Static file server for the benchmarks (Python 3 stdlib only), counting bytes.

    httpd.py --root DIR --port PORT --log FILE

Serves GET/HEAD of files under DIR on 127.0.0.1:PORT with `Range: bytes=N-[M]`
support, one thread per connection (listen backlog 4096, so a fleet of agents fetching
at once is not throttled by SYN drops), HTTP/1.1 keep-alive. Appends one line per
request to FILE: `<unix time> <path> <status> <request bytes> <response bytes>` where
the byte counts are what crossed the socket (request line + headers; status line +
headers + body), so the suite can report bytes on the wire per device.
"""
import argparse
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bench-httpd"
    sys_version = ""

    def log_message(self, fmt, *args):  # quiet: the byte log is enough
        pass

    def setup(self):
        super().setup()
        raw = self.wfile
        counter = self

        class Counting:
            def write(self, b):
                counter.sent += len(b)
                return raw.write(b)

            def flush(self):
                return raw.flush()

        self.sent = 0
        self.wfile = Counting()

    def _req_bytes(self):
        return len(self.raw_requestline) + sum(len(k) + len(v) + 4 for k, v in self.headers.items()) + 2

    def _log(self, status):
        line = f"{time.time():.6f} {self.path} {status} {self._req_bytes()} {self.sent}\n"
        with self.server.log_lock:
            self.server.log.write(line)
            self.server.log.flush()

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head):
        self.sent = 0
        rel = self.path.split("?", 1)[0].lstrip("/")
        full = os.path.realpath(os.path.join(self.server.root, rel))
        if not full.startswith(self.server.root + os.sep) or not os.path.isfile(full):
            body = b"not found\n"
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            self._log(404)
            return
        size = os.path.getsize(full)
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= max(size, 1):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self._log(416)
                return
            start = int(m.group(1))
            if m.group(2):
                end = min(int(m.group(2)), size - 1)
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not head:
            with open(full, "rb") as f:
                f.seek(start)
                self.wfile.write(f.read(end - start + 1))
        self._log(status)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096
    allow_reuse_address = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    srv = Server(("127.0.0.1", a.port), Handler)
    srv.root = os.path.realpath(a.root)
    srv.log = open(a.log, "a")
    srv.log_lock = threading.Lock()
    srv.serve_forever()


if __name__ == "__main__":
    main()
