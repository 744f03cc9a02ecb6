"""A minimal MQTT 3.1.1 client (Python 3 stdlib only) for the benchmarks.

It exists so that the suite can timestamp every message the moment it arrives (no
`mosquitto_sub` output buffering in between) and count the exact bytes of each packet.
Supports what the suite needs and nothing more: CONNECT (clean session), SUBSCRIBE,
PUBLISH (QoS 0 out; QoS 0/1 in, QoS 1 acknowledged), PINGREQ, DISCONNECT. No TLS: the
observer uses the broker's plain loopback listener.
"""
import socket
import struct
import threading
import time


def _varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def _str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


class Message:
    __slots__ = ("topic", "payload", "retain", "mono", "wall", "wire_bytes")

    def __init__(self, topic, payload, retain, mono, wall, wire_bytes):
        self.topic = topic
        self.payload = payload
        self.retain = retain
        self.mono = mono
        self.wall = wall
        self.wire_bytes = wire_bytes


class Client:
    """Connects at construction; a reader thread calls `on_message(Message)` per PUBLISH."""

    def __init__(self, host, port, client_id, on_message=None, keepalive=60, timeout=10):
        self.on_message = on_message or (lambda m: None)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._wlock = threading.Lock()
        self._next_id = 1
        self._acks = {}
        self._ack_cv = threading.Condition()
        self.closed = False
        self.error = None
        var = _str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive)
        self._send(0x10, var + _str(client_id))
        typ, body = self._read_packet()
        if typ >> 4 != 2 or len(body) < 2 or body[1] != 0:
            raise ConnectionError(f"MQTT CONNACK refused: {body!r}")
        self.sock.settimeout(None)
        self._keepalive = keepalive
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self._pinger = threading.Thread(target=self._ping_loop, daemon=True)
        self._pinger.start()

    # -- wire ---------------------------------------------------------------------------
    def _send(self, first, body):
        data = bytes([first]) + _varint(len(body)) + body
        with self._wlock:
            self.sock.sendall(data)
        return len(data)

    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return bytes(buf)

    def _read_packet(self):
        first = self._recv_exact(1)[0]
        mult, length, header = 1, 0, 1
        while True:
            b = self._recv_exact(1)[0]
            header += 1
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        body = self._recv_exact(length) if length else b""
        self._last_header = header
        return first, body

    def _read_loop(self):
        try:
            while True:
                first, body = self._read_packet()
                now_m, now_w = time.monotonic(), time.time()
                typ = first >> 4
                if typ == 3:  # PUBLISH
                    qos = (first >> 1) & 3
                    tlen = struct.unpack("!H", body[:2])[0]
                    topic = body[2 : 2 + tlen].decode("utf-8", "replace")
                    pos = 2 + tlen
                    if qos:
                        pid = body[pos : pos + 2]
                        pos += 2
                        if qos == 1:
                            self._send(0x40, pid)
                    msg = Message(topic, body[pos:], bool(first & 1), now_m, now_w, self._last_header + len(body))
                    self.on_message(msg)
                elif typ in (9, 11, 4):  # SUBACK, UNSUBACK, PUBACK
                    pid = struct.unpack("!H", body[:2])[0]
                    with self._ack_cv:
                        self._acks[pid] = body[2:]
                        self._ack_cv.notify_all()
        except (OSError, ConnectionError) as e:
            if not self.closed:
                self.error = e
        finally:
            self.closed = True
            with self._ack_cv:
                self._ack_cv.notify_all()

    def _ping_loop(self):
        while not self.closed:
            time.sleep(self._keepalive / 2)
            if self.closed:
                return
            try:
                self._send(0xC0, b"")
            except OSError:
                return

    def _pid(self):
        pid = self._next_id
        self._next_id = self._next_id % 65535 + 1
        return pid

    def _wait_ack(self, pid, timeout):
        deadline = time.monotonic() + timeout
        with self._ack_cv:
            while pid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise TimeoutError(f"no acknowledgement for packet {pid}")
                self._ack_cv.wait(left)
            return self._acks.pop(pid)

    # -- API ----------------------------------------------------------------------------
    def subscribe(self, *filters, timeout=10):
        pid = self._pid()
        body = struct.pack("!H", pid) + b"".join(_str(f) + b"\x00" for f in filters)
        self._send(0x82, body)
        granted = self._wait_ack(pid, timeout)
        if any(g == 0x80 for g in granted):
            raise ConnectionError(f"subscription refused: {filters}")

    def publish(self, topic, payload, retain=False, qos=0, timeout=10):
        """Returns the bytes this PUBLISH took on the wire."""
        if isinstance(payload, str):
            payload = payload.encode()
        first = 0x30 | (qos << 1) | (1 if retain else 0)
        if qos:
            pid = self._pid()
            n = self._send(first, _str(topic) + struct.pack("!H", pid) + payload)
            self._wait_ack(pid, timeout)
            return n
        return self._send(first, _str(topic) + payload)

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self._send(0xE0, b"")
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
