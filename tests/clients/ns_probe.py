#!/usr/bin/env python3
"""Asks who has an IPv6 address on a link, as a host resolving it would (a Neighbor
Solicitation to the solicited-node multicast address, with our link-layer address), and prints
one JSON line: the link-layer addresses of every Neighbor Advertisement for it heard within
--seconds. For lbd's test that only the balancer answers for an IPv6 VIP."""
import argparse
import json

from scapy.all import (AsyncSniffer, Ether, ICMPv6ND_NA, ICMPv6ND_NS,
                       ICMPv6NDOptSrcLLAddr, IPv6, get_if_hwaddr, sendp)
from scapy.utils6 import in6_getnsma, in6_getnsmac
from scapy.pton_ntop import inet_pton
import socket


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iface", required=True)
    parser.add_argument("--source", required=True, help="our IPv6 address")
    parser.add_argument("--target", required=True)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    mac = get_if_hwaddr(args.iface)
    group = in6_getnsma(inet_pton(socket.AF_INET6, args.target))
    group_text = socket.inet_ntop(socket.AF_INET6, group)
    sniffer = AsyncSniffer(
        iface=args.iface,
        lfilter=lambda p: ICMPv6ND_NA in p and p[ICMPv6ND_NA].tgt == args.target,
        timeout=args.seconds,
    )
    sniffer.start()
    sendp(
        Ether(src=mac, dst=in6_getnsmac(group))
        / IPv6(src=args.source, dst=group_text, hlim=255)
        / ICMPv6ND_NS(tgt=args.target)
        / ICMPv6NDOptSrcLLAddr(lladdr=mac),
        iface=args.iface,
        verbose=False,
    )
    sniffer.join()
    answers = sorted({p[Ether].src for p in sniffer.results or []})
    print(json.dumps({"answered_by": answers}))


if __name__ == "__main__":
    main()
