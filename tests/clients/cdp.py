#!/usr/bin/env python3
"""Drives a page open in a headless Chromium through the DevTools protocol (a websocket), for
lbd's status page test: the standard library has no websocket client, so this is the least of
one (RFC 6455: the handshake, masked text frames out, unfragmented frames in).

  cdp.py --port P eval EXPR            prints EXPR's value (JSON)
  cdp.py --port P wait EXPR SECONDS    waits until EXPR is truthy; prints the milliseconds it took,
                                       or exits 1 with its last value after SECONDS
  cdp.py --port P screenshot FILE      writes the page as it is now to FILE (PNG)
"""
import argparse
import base64
import json
import os
import socket
import struct
import sys
import time
import urllib.request


class Page:
    def __init__(self, port):
        # The browser may still be starting: its DevTools endpoint comes up within seconds.
        deadline = time.monotonic() + 15
        while True:
            try:
                targets = json.load(
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
                page = next(t for t in targets if t.get("type") == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        url = page["webSocketDebuggerUrl"]
        host_port, path = url[len("ws://"):].split("/", 1)
        host, ws_port = host_port.split(":")
        self.sock = socket.create_connection((host, int(ws_port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("DevTools closed the handshake")
            reply += chunk
        if b" 101 " not in reply.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"DevTools refused the websocket: {reply[:100]!r}")
        self.pending = reply.split(b"\r\n\r\n", 1)[1]
        self.next_id = 0

    def _send(self, text):
        data = text.encode()
        mask = os.urandom(4)
        header = bytes([0x81])
        if len(data) < 126:
            header += bytes([0x80 | len(data)])
        elif len(data) < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(data))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(data))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(header + mask + masked)

    def _read(self, n):
        while len(self.pending) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("DevTools closed the connection")
            self.pending += chunk
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def _receive(self):
        first, second = self._read(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack(">H", self._read(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", self._read(8))[0]
        payload = self._read(length)
        return first & 0x0F, payload

    def call(self, method, params):
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            opcode, payload = self._receive()
            if opcode != 1:
                continue
            message = json.loads(payload)
            if message.get("id") == self.next_id:
                return message

    def evaluate(self, expression):
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        result = reply.get("result", {})
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"]))
        return result.get("result", {}).get("value")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("mode", choices=["eval", "wait", "screenshot"])
    parser.add_argument("expression", help="the expression, or the screenshot's file")
    parser.add_argument("seconds", nargs="?", type=float, default=5.0)
    args = parser.parse_args()
    page = Page(args.port)
    if args.mode == "eval":
        print(json.dumps(page.evaluate(args.expression)))
        return 0
    if args.mode == "screenshot":
        shot = page.call("Page.captureScreenshot", {"format": "png"})
        with open(args.expression, "wb") as out:
            out.write(base64.b64decode(shot["result"]["data"]))
        return 0
    started = time.monotonic()
    value = None
    while time.monotonic() - started < args.seconds:
        value = page.evaluate(args.expression)
        if value:
            print(int((time.monotonic() - started) * 1000))
            return 0
        time.sleep(0.05)
    print(json.dumps(value))
    return 1


if __name__ == "__main__":
    sys.exit(main())
