#!/usr/bin/env python3
"""Long-lived HTTP/1.1 connections through a VIP, for lbd's live-change test.

Opens one keep-alive connection from each given source address and sends a GET on every one
of them every --every seconds (100 ms) for --seconds seconds, noting the longest wait for an
answer; meanwhile opens a new connection every 200 ms from
the next address (new clients must keep being served). Prints one JSON line and exits 0 when:
every request on a long-lived connection was answered within --timeout seconds, no connection
was reset or closed, each connection stayed on one server (the body names it), and every new
client was served (at the latest on a second try). Bounded in
time and count; talks only to the VIP given.
"""
import argparse
import json
import socket
import sys
import time


def request(sock, host):
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by peer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by peer mid-body")
        body += chunk
    return body.decode().strip()


def connect(source, vip, port, timeout):
    sock = socket.create_connection((vip, port), timeout=timeout, source_address=(source, 0))
    sock.settimeout(timeout)
    return sock


def server_of(body):
    return dict(w.split("=", 1) for w in body.split() if "=" in w).get("server")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, default=8088)
    parser.add_argument("--sources", required=True, help="space-separated long-lived sources")
    parser.add_argument("--fresh", required=True, help="space-separated sources for new clients")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--every", type=float, default=0.1, help="seconds between rounds")
    args = parser.parse_args()

    failures = []
    conns = {}
    for source in args.sources.split():
        try:
            sock = connect(source, args.vip, args.port, args.timeout)
            conns[source] = (sock, server_of(request(sock, args.vip)))
        except OSError as error:
            failures.append(f"{source}: first request: {error}")
    requests = 0
    # The longest a long-lived connection went without an answer: from the end of one
    # answered request to the end of the next.
    max_gap = 0.0
    last_answer = {source: time.monotonic() for source in conns}
    fresh_ok = fresh_failed = fresh_retried = 0
    fresh_sources = args.fresh.split()
    deadline = time.monotonic() + args.seconds
    tick = 0
    while time.monotonic() < deadline and not failures:
        started = time.monotonic()
        for source, (sock, server) in list(conns.items()):
            try:
                now_server = server_of(request(sock, args.vip))
                requests += 1
                answered = time.monotonic()
                max_gap = max(max_gap, answered - last_answer[source])
                last_answer[source] = answered
                if now_server != server:
                    failures.append(f"{source}: moved from {server} to {now_server}")
            except OSError as error:
                failures.append(f"{source}: request {requests}: {error}")
        if tick % 2 == 0 and fresh_sources:
            source = fresh_sources[(tick // 2) % len(fresh_sources)]
            # A new client whose server is removed while its one request is in flight loses
            # that request (as with IPVS); it must be served when it tries again.
            for attempt in (1, 2):
                try:
                    with connect(source, args.vip, args.port, args.timeout) as sock:
                        request(sock, args.vip)
                    fresh_ok += 1
                    break
                except OSError as error:
                    if attempt == 2:
                        fresh_failed += 1
                        failures.append(f"new client {source}: {error}")
                    else:
                        fresh_retried += 1
        tick += 1
        time.sleep(max(0.0, args.every - (time.monotonic() - started)))
    for sock, _ in conns.values():
        sock.close()
    print(json.dumps({
        "connections": len(conns),
        "requests": requests,
        "fresh_ok": fresh_ok,
        "fresh_failed": fresh_failed,
        "fresh_retried": fresh_retried,
        "servers": sorted({s for _, s in conns.values() if s}),
        "max_gap_ms": round(max_gap * 1000),
        "failures": failures[:20],
    }))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
