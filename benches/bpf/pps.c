// SPDX-License-Identifier: (GPL-2.0 OR MIT)
//
// XDP programs of the packet-rate benchmark (benches/pps.rs); none of them is part of lbd.
//   pps_gen   the traffic generator, run with BPF_PROG_TEST_RUN in live-frames mode on the
//             wire's far end: writes one frame per run from templates and sends it (XDP_TX)
//             to the balancer's interface. Source addresses cycle through `sources` clients
//             (IPv4, or the last 32 bits of an IPv6 address).
//   pps_sink  on the wire's far end: counts every frame the forwarder sends, per destination
//             MAC (one slot per real server, slot 0 for anything else), and drops it.
//   pps_sink_tc  the same count and drop at tc ingress of the wire's far end, for the sink
//             without XDP: a veth whose peer runs XDP copies every skb with less than 256
//             bytes of headroom, which AF_XDP copy mode's skbs are; a NIC does not.
//   pps_fwd   the in-kernel XDP contender: the same DR rewrite as lbd (destination MAC from a
//             hash of the source address, source MAC = own), then XDP_TX; IPv4 and IPv6.
//   pps_fwd_redirect  the same, sent with XDP_REDIRECT to the receiving device: the XDP
//             contender with the tc sink (see the program).
//   pps_pass  XDP_PASS only: in front of the nftables contender, so that every contender's
//             frames arrive through the same veth XDP receive path.
//   pps_xsk   steering for the minimal AF_XDP forwarder: every frame to the socket of its
//             queue.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define FRAME_LEN 60
// An IPv6 TCP SYN without options: Ethernet 14, IPv6 40, TCP 20.
#define FRAME6_LEN 74
#define TEMPLATE_LEN 80
#define TEMPLATES 4
#define MAX_SERVERS 64

enum template_kind { TEMPLATE_VIP = 0, TEMPLATE_ARP = 1, TEMPLATE_OTHER = 2, TEMPLATE_VIP6 = 3 };

enum traffic {
	TRAFFIC_VIP = 0,  // every frame to the VIP
	TRAFFIC_MIX = 1,  // 1% ARP requests, 1% to a non-VIP address, the rest to the VIP
	TRAFFIC_VIP6 = 2, // every frame to the IPv6 VIP (FRAME6_LEN bytes)
};

struct gen_config {
	__u32 sources;  // clients to cycle through, from the template's source address upwards
	__u32 traffic;  // enum traffic
	__u64 interval_ns; // 0: flat out; else paced, one frame per interval on each CPU
	__u64 limit;       // paced: frames to send in all, per CPU
};

struct frame_template {
	__u8 bytes[TEMPLATE_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gen_config);
} gen_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TEMPLATES);
	__type(key, __u32);
	__type(value, struct frame_template);
} gen_templates SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} gen_sent SEC(".maps");

// The paced schedule of each CPU (user space zeroes it before each paced run).
struct pacing {
	__u64 sent;    // frames sent under the schedule
	__u64 next_ns; // when the next frame is due
};

// At most this many frames go out back to back when the generator was held up: catching up
// a long delay at full speed would be a burst no real traffic source makes.
#define MAX_BURST 32

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pacing);
} gen_paced SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVERS);
	__type(key, __u64);   // destination MAC in the low 48 bits, as laid out in memory
	__type(value, __u32); // counter slot, 1..
} sink_macs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SERVERS + 1);
	__type(key, __u32);
	__type(value, __u64);
} sink_counts SEC(".maps");

struct fwd_config {
	__be32 vip;
	__u32 servers;
	__u8 own_mac[ETH_ALEN];
	__u8 pad[2];
	__be32 vip6[4];
};

struct server_mac {
	__u8 mac[ETH_ALEN];
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fwd_config);
} fwd_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SERVERS);
	__type(key, __u32);
	__type(value, struct server_mac);
} fwd_servers SEC(".maps");

// RFC 1624 eqn. 3 for a 32-bit field: the words are summed as they lie in memory, which the
// one's complement sum allows whatever the byte order.
static __always_inline __u16 csum_replace32(__u16 check, __u32 from, __u32 to)
{
	__u32 sum = (__u16)~check;
	sum += (__u16)~(from & 0xffff) + (__u16)~(from >> 16);
	sum += (to & 0xffff) + (to >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

// A SYN to the IPv6 VIP from `client` past the template's source. The frame must hold
// FRAME6_LEN bytes: the generator's run was started with that length.
static __always_inline int write_syn6(void *data, void *data_end, __u32 client)
{
	__u32 kind = TEMPLATE_VIP6;

	if (data + FRAME6_LEN > data_end)
		return XDP_ABORTED;
	struct frame_template *template = bpf_map_lookup_elem(&gen_templates, &kind);
	if (!template)
		return XDP_ABORTED;
	__builtin_memcpy(data, template->bytes, FRAME6_LEN);
	struct ipv6hdr *ip = data + sizeof(struct ethhdr);
	// IPv6 has no header checksum; TCP's covers the source address (RFC 8200 8.1).
	__u32 from = ip->saddr.in6_u.u6_addr32[3];
	__u32 to = bpf_htonl(bpf_ntohl(from) + client);
	ip->saddr.in6_u.u6_addr32[3] = to;
	__u16 *l4_check = (void *)(ip + 1) + 16;
	*l4_check = csum_replace32(*l4_check, from, to);
	return XDP_TX;
}

SEC("xdp")
int pps_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;

	if (data + FRAME_LEN > data_end)
		return XDP_ABORTED;
	struct gen_config *config = bpf_map_lookup_elem(&gen_config, &zero);
	__u64 *sent = bpf_map_lookup_elem(&gen_sent, &zero);
	if (!config || !sent || config->sources == 0)
		return XDP_ABORTED;
	if (config->interval_ns) {
		// Pacing without leaving the kernel: a frame ahead of the schedule is dropped here
		// (recycled at once) instead of sent; one long run, no per-call setup cost.
		struct pacing *pacing = bpf_map_lookup_elem(&gen_paced, &zero);
		__u64 now = bpf_ktime_get_ns();
		if (!pacing || pacing->sent >= config->limit || now < pacing->next_ns)
			return XDP_DROP;
		__u64 earliest = now - MAX_BURST * config->interval_ns;
		__u64 due = pacing->next_ns > earliest ? pacing->next_ns : earliest;
		pacing->next_ns = due + config->interval_ns;
		pacing->sent += 1;
	}
	__u64 index = *sent;
	*sent = index + 1;
	if (config->traffic == TRAFFIC_VIP6)
		return write_syn6(data, data_end, (__u32)(index % config->sources));

	__u32 kind = TEMPLATE_VIP;
	if (config->traffic == TRAFFIC_MIX) {
		__u32 slot = index % 100;
		if (slot == 0)
			kind = TEMPLATE_ARP;
		else if (slot == 1)
			kind = TEMPLATE_OTHER;
	}
	struct frame_template *template = bpf_map_lookup_elem(&gen_templates, &kind);
	if (!template)
		return XDP_ABORTED;
	// Pages are recycled between runs: every frame is written whole.
	__builtin_memcpy(data, template->bytes, FRAME_LEN);
	if (kind == TEMPLATE_ARP)
		return XDP_TX;

	struct iphdr *ip = data + sizeof(struct ethhdr);
	__u32 from = ip->saddr;
	__u32 to = bpf_htonl(bpf_ntohl(from) + (__u32)(index % config->sources));
	ip->saddr = to;
	ip->check = csum_replace32(ip->check, from, to);
	// TCP checksum at offset 16 of the header (RFC 9293), UDP at 6 (RFC 768); both cover the
	// source address in their pseudo-header.
	__u16 *l4_check = (void *)(ip + 1) + (ip->protocol == IPPROTO_TCP ? 16 : 6);
	if ((void *)(l4_check + 1) > data_end)
		return XDP_ABORTED;
	if (ip->protocol == IPPROTO_TCP || *l4_check != 0)
		*l4_check = csum_replace32(*l4_check, from, to);
	return XDP_TX;
}

// Counts one frame in the slot of its destination MAC.
static __always_inline void sink_count(void *data, void *data_end)
{
	__u64 mac = 0;
	__u32 slot = 0;

	if (data + ETH_ALEN <= data_end) {
		__builtin_memcpy(&mac, data, ETH_ALEN);
		__u32 *known = bpf_map_lookup_elem(&sink_macs, &mac);
		if (known)
			slot = *known;
	}
	__u64 *count = bpf_map_lookup_elem(&sink_counts, &slot);
	if (count)
		*count += 1;
}

SEC("xdp")
int pps_sink(struct xdp_md *ctx)
{
	sink_count((void *)(long)ctx->data, (void *)(long)ctx->data_end);
	return XDP_DROP;
}

SEC("classifier")
int pps_sink_tc(struct __sk_buff *skb)
{
	// The Ethernet header is in the linear part of every skb that reaches tc ingress.
	sink_count((void *)(long)skb->data, (void *)(long)skb->data_end);
	return TC_ACT_SHOT;
}

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

SEC("xdp")
int pps_xsk(struct xdp_md *ctx)
{
	return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_DROP);
}

// Sends the frame to the real server of `client` (a client address, or a fold of one).
static __always_inline int fwd_to_server(struct ethhdr *eth, struct fwd_config *config,
					 __u32 client)
{
	// Multiplicative hash of the client address: source-IP affinity, as jhash gives nftables.
	__u32 hash = client * 0x9e3779b1u;
	__u32 index = (hash ^ (hash >> 16)) % config->servers;
	struct server_mac *server = bpf_map_lookup_elem(&fwd_servers, &index);
	if (!server)
		return XDP_PASS;
	__builtin_memcpy(eth->h_dest, server->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, config->own_mac, ETH_ALEN);
	return XDP_TX;
}

static __always_inline int fwd(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	struct fwd_config *config = bpf_map_lookup_elem(&fwd_config, &zero);
	if (!config || config->servers == 0)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end || ip->daddr != config->vip)
			return XDP_PASS;
		return fwd_to_server(eth, config, bpf_ntohl(ip->saddr));
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return XDP_PASS;
		__be32 *dst = ip->daddr.in6_u.u6_addr32;
		__be32 *src = ip->saddr.in6_u.u6_addr32;
		if (dst[0] != config->vip6[0] || dst[1] != config->vip6[1] ||
		    dst[2] != config->vip6[2] || dst[3] != config->vip6[3])
			return XDP_PASS;
		return fwd_to_server(eth, config, bpf_ntohl(src[0] ^ src[1] ^ src[2] ^ src[3]));
	}
	return XDP_PASS;
}

SEC("xdp")
int pps_fwd(struct xdp_md *ctx)
{
	return fwd(ctx);
}

// XDP_TX to a veth schedules the peer's NAPI only when the peer runs XDP itself
// (veth_xdp_flush), so with the tc sink the frames would wait in sw0's ring for good. A
// redirect to the same device goes through ndo_xdp_xmit, which flushes whenever the peer has
// NAPI (here: GRO).
SEC("xdp")
int pps_fwd_redirect(struct xdp_md *ctx)
{
	int action = fwd(ctx);

	return action == XDP_TX ? bpf_redirect(ctx->ingress_ifindex, 0) : action;
}

SEC("xdp")
int pps_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
