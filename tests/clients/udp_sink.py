#!/usr/bin/env python3
"""A UDP server for lbd's fragment tests: counts the datagrams it receives on --ports (the
kernel hands it whole, reassembled datagrams only) for --seconds, then prints one JSON line:
how many datagrams of each size arrived on each port."""
import argparse
import json
import select
import socket
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports", required=True, help="comma-separated")
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    socks = {}
    for port in args.ports.split(","):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Room for every datagram of a burst even when this process is slow to run (as root,
        # past net.core.rmem_max).
        try:
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
        except OSError:
            pass
        sock.bind(("0.0.0.0", int(port)))
        socks[sock] = port
    print("ready", flush=True)
    received = {port: {} for port in socks.values()}
    deadline = time.monotonic() + args.seconds
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select(list(socks), [], [], left)
        for sock in readable:
            size = str(len(sock.recv(65535)))
            sizes = received[socks[sock]]
            sizes[size] = sizes.get(size, 0) + 1
    print(json.dumps(received))


if __name__ == "__main__":
    main()
