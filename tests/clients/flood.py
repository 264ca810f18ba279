#!/usr/bin/env python3
"""Spoofed TCP segments to a VIP, for lbd's table-exhaustion tests.

Writes --count raw Ethernet frames on --iface (an AF_PACKET socket: root, in the lab's client
namespace) from --count different source addresses in 198.19.0.0/16 (inside the lab's
198.18.0.0/15 and routed nowhere), with the flags --flags names: `ack` (a bare ACK, as in the
middle of a connection nobody opened) or `syn` (a connection that will never complete). Paced at
about --rate frames a second, so that it measures tables, not ring overflows. Bounded in count
and time; prints one JSON line.
"""
import argparse
import json
import socket
import struct
import time


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(dst_mac, src_mac, src, dst, sport, dport, flags):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 1 if flags & 0x10 else 0, 5 << 4, flags, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + tcp


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iface", default="eth0")
    parser.add_argument("--dst-mac", required=True)
    parser.add_argument("--src-mac", required=True)
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, default=8088)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--flags", choices=["ack", "syn"], required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first source address")
    parser.add_argument("--rate", type=int, default=20000)
    args = parser.parse_args()
    if not 0 < args.count <= 60000:
        parser.error("--count must be in 1..60000")
    flags = 0x10 if args.flags == "ack" else 0x02
    dst_mac = bytes.fromhex(args.dst_mac.replace(":", ""))
    src_mac = bytes.fromhex(args.src_mac.replace(":", ""))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((args.iface, 0))
    started = time.monotonic()
    for i in range(args.count):
        n = args.first + i
        src = f"198.19.{n // 250 % 250}.{n % 250 + 1}"
        sock.send(frame(dst_mac, src_mac, src, args.vip, 20000 + n % 40000, args.port, flags))
        # Paced: one short pause per 50 frames.
        if i % 50 == 49:
            ahead = started + (i + 1) / args.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    print(json.dumps({"sent": args.count, "seconds": round(time.monotonic() - started, 3)}))


if __name__ == "__main__":
    main()
