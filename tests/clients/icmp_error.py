#!/usr/bin/env python3
"""ICMP errors about a connection through lbd, as a router on the path would send them.

  send:  --lb-mac MAC --router ADDR --vip VIP --client ADDR --port SERVICE --client-port PORT
         sends "fragmentation needed" (IPv4) or "packet too big" (IPv6) to the VIP, quoting
         the segment the real server sent the client (from VIP:PORT to CLIENT:CLIENT_PORT).
  sniff: --vip VIP [VIP...] --seconds S
         prints "ready", then after S seconds one JSON line: "VIP CLIENT_PORT" of every ICMP
         error to one of the VIPs that reached this host's eth0 (the quoted client port), with
         their counts.
"""
import argparse
import json
import sys

from scapy.all import (AsyncSniffer, Ether, ICMP, ICMPv6PacketTooBig, IP, IPv6, TCP,
                       get_if_hwaddr, sendp)


def send(args):
    mac = get_if_hwaddr("eth0")
    vip = args.vip[0]
    if ":" in vip:
        sent = IPv6(src=vip, dst=args.client) / TCP(sport=args.port, dport=args.client_port,
                                                        flags="A", seq=5000)
        error = IPv6(src=args.router, dst=vip) / ICMPv6PacketTooBig(mtu=1280) / bytes(sent)
    else:
        sent = IP(src=vip, dst=args.client, flags="DF") / TCP(
            sport=args.port, dport=args.client_port, flags="A", seq=5000)
        error = IP(src=args.router, dst=vip) / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(sent)[:28]
    sendp(Ether(src=mac, dst=args.lb_mac) / error, iface="eth0", verbose=False)


def quoted_port(packet):
    if ICMPv6PacketTooBig in packet:
        inner = IPv6(bytes(packet[ICMPv6PacketTooBig].payload))
    else:
        inner = IP(bytes(packet[ICMP].payload))
    return inner[TCP].dport if TCP in inner else None


def sniff(args):
    def wanted(p):
        if IPv6 in p and ICMPv6PacketTooBig in p:
            return p[IPv6].dst in args.vip
        return IP in p and p[IP].dst in args.vip and ICMP in p and p[ICMP].type == 3
    sniffer = AsyncSniffer(iface="eth0", lfilter=wanted, timeout=args.seconds)
    sniffer.start()
    print("ready", flush=True)
    sniffer.join()
    ports = {}
    for packet in sniffer.results or []:
        vip = packet[IPv6].dst if IPv6 in packet else packet[IP].dst
        key = f"{vip} {quoted_port(packet)}"
        ports[key] = ports.get(key, 0) + 1
    print(json.dumps(ports), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["send", "sniff"])
    parser.add_argument("--vip", required=True, nargs="+")
    parser.add_argument("--lb-mac")
    parser.add_argument("--router")
    parser.add_argument("--client")
    parser.add_argument("--port", type=int)
    parser.add_argument("--client-port", type=int)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if args.mode == "send":
        send(args)
    else:
        sniff(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
