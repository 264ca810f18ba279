#!/usr/bin/env python3
"""Hostile control clients for lbd's lock-out test: opens --clients connections to the control
socket, pipelines requests (config show: answered at once) on every connection lbd admits without ever reading a reply,
holds them for --hold seconds, then prints one JSON line: how many lbd refused at once, how
many it admitted, and how many of those it had closed by the end (it must drop clients that do
not read)."""
import argparse
import json
import socket
import time

REQUEST = b'{"version":1,"command":{"name":"config-show"}}\n'


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--hold", type=float, default=8)
    args = parser.parse_args()
    socks = []
    for _ in range(args.clients):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.socket)
        socks.append(sock)
    time.sleep(0.5)
    admitted, refused = [], 0
    for sock in socks:
        sock.setblocking(False)
        try:
            peeked = sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            peeked = b""
        if b"too many" in peeked:
            refused += 1
        else:
            admitted.append(sock)
    # Keep every admitted connection's send buffer full for the whole hold: lbd keeps answering
    # until its replies fill the socket, then must give up on the client.
    closed = set()
    deadline = time.monotonic() + args.hold
    while time.monotonic() < deadline:
        for sock in admitted:
            if sock in closed:
                continue
            try:
                while True:
                    sock.send(REQUEST)
            except BlockingIOError:
                pass
            except OSError:
                closed.add(sock)
        time.sleep(0.05)
    for sock in admitted:
        if sock in closed:
            continue
        sock.settimeout(2)
        try:
            while sock.recv(1 << 16):
                pass
            closed.add(sock)
        except ConnectionResetError:
            closed.add(sock)
        except OSError:
            pass
    print(json.dumps({"refused": refused, "admitted": len(admitted), "closed": len(closed)}))


if __name__ == "__main__":
    main()
