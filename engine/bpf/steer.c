// SPDX-License-Identifier: (GPL-2.0 OR MIT)
//
// lbd's XDP steering program. It runs on every frame the balancer's interface receives and
// decides only where the frame goes, never what it becomes:
//   - an IPv4 frame whose destination is a VIP, or an ARP request for a VIP, is redirected to
//     the AF_XDP socket of the queue it arrived on (the worker of that queue handles it);
//   - likewise an IPv6 frame whose destination is an IPv6 VIP (`lbd_vips6`), or a Neighbor
//     Solicitation (ICMPv6 type 135, right after the fixed header) whose target is one;
//   - everything else gets XDP_PASS, so the host's own networking (ssh, management, health
//     checks, neighbour resolution for the real servers) keeps working on the same interface.
// The engine fills `lbd_vips` with the configured VIPs and `lbd_xsks` with one socket per
// served queue. If a queue has no socket, bpf_redirect_map falls back to XDP_PASS.
// A VIP's flags say whether this node answers ARP for it (VIP_ANSWERS_ARP): in an HA pair only
// the active node does; a passive one still takes every IP frame to a VIP.
// The node that answers for a VIP also watches for others that do (the DR check): ARP whose
// sender is a VIP (a gratuitous claim, an answer to lbd's own question), Neighbor
// Advertisements for an IPv6 VIP, and the SYN-ACKs real servers send from a VIP to lbd's probe
// address (`lbd_probe4`, `lbd_probe6`) on a probe port (PROBE_PORT_MIN..PROBE_PORT_MAX) go to
// the workers too.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_VIPS 4096
#define MAX_QUEUES 256
#define VIP_ANSWERS_ARP 1
// The DR check's TCP source ports (engine/src/packet/drcheck.rs PROBE_PORTS): above the
// kernel's default ephemeral range.
#define PROBE_PORT_MIN 61000
#define PROBE_PORT_MAX 61999

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VIPS);
	__type(key, __u32);   // VIP, network byte order
	__type(value, __u32); // VIP_ANSWERS_ARP or 0
} lbd_vips SEC(".maps");

struct vip6 {
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VIPS);
	__type(key, struct vip6); // IPv6 VIP, network byte order
	__type(value, __u32);     // VIP_ANSWERS_ARP (answers Neighbor Solicitations) or 0
} lbd_vips6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);   // this host's probe address, network byte order
	__type(value, __u32); // unused
} lbd_probe4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, struct vip6);
	__type(value, __u32);
} lbd_probe6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);   // queue index
	__type(value, __u32); // AF_XDP socket fd
} lbd_xsks SEC(".maps");

// RFC 826 ARP for Ethernet/IPv4, as it follows the Ethernet header.
struct arp_eth_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 oper;
	__u8 sha[ETH_ALEN];
	__u8 spa[4];
	__u8 tha[ETH_ALEN];
	__u8 tpa[4];
} __attribute__((packed));

static __always_inline int is_vip(__u32 addr)
{
	return bpf_map_lookup_elem(&lbd_vips, &addr) != NULL;
}

static __always_inline int answers_for(void *map, void *key)
{
	__u32 *flags = bpf_map_lookup_elem(map, key);
	return flags && (*flags & VIP_ANSWERS_ARP);
}

// A SYN-ACK to a probe port: a real server answering the DR check's probe.
static __always_inline int is_probe_answer(struct tcphdr *tcp, void *data_end)
{
	if ((void *)(tcp + 1) > data_end)
		return 0;
	__u16 port = bpf_ntohs(tcp->dest);
	return tcp->syn && tcp->ack && port >= PROBE_PORT_MIN && port <= PROBE_PORT_MAX;
}

SEC("xdp")
int lbd_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return XDP_PASS;
		if (!is_vip(ip->daddr)) {
			struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
			if (ip->protocol != IPPROTO_TCP || ip->ihl < 5 ||
			    !bpf_map_lookup_elem(&lbd_probe4, &ip->daddr) ||
			    !answers_for(&lbd_vips, &ip->saddr) || !is_probe_answer(tcp, data_end))
				return XDP_PASS;
		}
	} else if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		struct arp_eth_ipv4 *arp = (void *)(eth + 1);
		__u32 target;
		__u32 sender;
		if ((void *)(arp + 1) > data_end)
			return XDP_PASS;
		__builtin_memcpy(&target, arp->tpa, sizeof(target));
		__builtin_memcpy(&sender, arp->spa, sizeof(sender));
		// A question for a VIP, or another station speaking for one.
		int question = arp->oper == bpf_htons(1) && answers_for(&lbd_vips, &target);
		if (!question && !answers_for(&lbd_vips, &sender))
			return XDP_PASS;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct vip6 key;
		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		__builtin_memcpy(key.addr, &ip6->daddr, sizeof(key.addr));
		if (bpf_map_lookup_elem(&lbd_vips6, &key))
			goto redirect;
		if (ip6->nexthdr == IPPROTO_TCP) {
			struct tcphdr *tcp = (void *)(ip6 + 1);
			__builtin_memcpy(key.addr, &ip6->daddr, sizeof(key.addr));
			if (!bpf_map_lookup_elem(&lbd_probe6, &key))
				return XDP_PASS;
			__builtin_memcpy(key.addr, &ip6->saddr, sizeof(key.addr));
			if (!answers_for(&lbd_vips6, &key) || !is_probe_answer(tcp, data_end))
				return XDP_PASS;
			goto redirect;
		}
		// A Neighbor Solicitation goes to the solicited-node multicast address: its target
		// says whom it asks for (ICMPv6 type 135, code 0, checksum, reserved, target); an
		// Advertisement (136) for a VIP is another station speaking for it.
		if (ip6->nexthdr != 58)
			return XDP_PASS;
		__u8 *icmp = (void *)(ip6 + 1);
		if ((void *)(icmp + 24) > data_end || (icmp[0] != 135 && icmp[0] != 136))
			return XDP_PASS;
		__builtin_memcpy(key.addr, icmp + 8, sizeof(key.addr));
		if (!answers_for(&lbd_vips6, &key))
			return XDP_PASS;
	} else {
		return XDP_PASS;
	}
redirect:
	return bpf_redirect_map(&lbd_xsks, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "Dual MIT/GPL";
