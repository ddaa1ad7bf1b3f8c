// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//
// turnpike's kernel path: an XDP program that relays the ChannelData of channels user space has
// installed, without waking user space.
//
//  client -> server   UDP [ChannelData ch, len][payload]  to a listening port
//     becomes         UDP [payload] from the allocation's relayed address to the channel's peer
//  peer -> relayed    UDP [payload]
//     becomes         UDP [ChannelData ch, len][payload] from the listening address to the client
//
// User space is the authority: it writes an entry into `channels` (and its reverse in `peers`) only
// while the channel is bound and its permission is live, and deletes it when either ends. Anything
// this program does not fully recognise goes up to user space untouched (XDP_PASS): STUN, Send and
// Data indications, TCP, fragments, IPv4 options, IPv6 extension headers, padded or truncated
// ChannelData, unknown channels, mixed address families, and datagrams whose route the kernel's FIB
// cannot resolve (no neighbour entry yet, forwarding disabled on the interface, a local peer).
//
// Built by build.rs with `clang -O2 -target bpf` when the `kernel-path` cargo feature is on.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
// A relayed datagram gets a fresh TTL / hop limit, as one user space sends would.
#define OUT_TTL 64

// Keep in step with src/kernel_path/maps.rs.
struct channel_key {
	__u8 client_ip[16]; // IPv4: the first 4 bytes, the rest zero
	__be16 client_port;
	__be16 server_port; // the listening port the client sends to
	__be16 channel;     // as on the wire
	__u8 family;        // 4 or 6
	__u8 pad;
};

struct channel_value {
	__u8 peer_ip[16];
	__u8 relay_ip[16];  // the relay socket's bound address
	__u8 server_ip[16]; // the listening address the client sends to
	__be16 peer_port;
	__be16 relay_port;
	// 0: user space did not know the address (a wildcard listener): the first ChannelData from the
	// client tells it, and until then nothing is relayed towards the client here.
	__u32 server_ip_known;
	__u64 to_peer_packets;
	__u64 to_peer_bytes;
	__u64 to_client_packets;
	__u64 to_client_bytes;
};

struct peer_key {
	__u8 peer_ip[16];
	__u8 relay_ip[16];
	__be16 peer_port;
	__be16 relay_port;
	__u8 family;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct channel_key);
	__type(value, struct channel_value);
} channels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct peer_key);
	__type(value, struct channel_key);
} peers SEC(".maps");

// What the program did, per CPU (user space sums them for metrics and tests).
enum {
	STAT_TO_PEER = 0,
	STAT_TO_CLIENT = 1,
	STAT_NO_ROUTE = 2, // an installed channel's datagram went up: the FIB lookup did not resolve
	STAT_COUNT = 3,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 what)
{
	__u64 *n = bpf_map_lookup_elem(&stats, &what);
	if (n)
		*n += 1;
}

// One's complement arithmetic (RFC 1071), on 16-bit words as they lie in memory: the sum does not
// depend on byte order as long as every word is taken the same way.
static __always_inline __u32 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum;
}

// Adds (`sign` 1) or removes (`sign` 0) an address of `words` 16-bit words (2 for IPv4, 8 for IPv6).
static __always_inline __u32 sum_addr(__u32 sum, const __u8 *ip, int words, int sign)
{
#pragma unroll
	for (int i = 0; i < 8; i++) {
		if (i < words) {
			__u16 w;
			__builtin_memcpy(&w, ip + 2 * i, 2);
			sum += sign ? w : (__u16)~w;
		}
	}
	return sum;
}

static __always_inline __u32 sum_word(__u32 sum, __u16 w, int sign)
{
	return sum + (sign ? w : (__u16)~w);
}

// RFC 1624 eqn. 3: the old checksum with the old words taken out and the new ones put in.
static __always_inline __u16 finish_udp_csum(__u32 sum)
{
	__u16 c = ~fold(sum);
	return c ? c : 0xffff; // a computed 0 is sent as all ones (RFC 768)
}

static __always_inline __u16 ipv4_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	return ~fold(sum);
}

static __always_inline int same_ip(const __u8 *a, const __u8 *b)
{
	__u64 a0, a1, b0, b1;
	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	__builtin_memcpy(&b0, b, 8);
	__builtin_memcpy(&b1, b + 8, 8);
	return a0 == b0 && a1 == b1;
}

// Where a datagram goes and what it carries, family aside.
struct flow {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
};

// Resolves the next hop for `f` leaving towards `f->dst`; fills the MAC addresses and the egress
// interface. Returns 0 when the datagram can go out here.
static __always_inline int route(struct xdp_md *ctx, const struct flow *f, int v6, __u16 tot_len,
				 struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = v6 ? AF_INET6 : AF_INET;
	fib->l4_protocol = IPPROTO_UDP;
	fib->sport = f->sport;
	fib->dport = f->dport;
	fib->tot_len = tot_len;
	fib->ifindex = ctx->ingress_ifindex;
	if (v6) {
		__builtin_memcpy(fib->ipv6_src, f->src, 16);
		__builtin_memcpy(fib->ipv6_dst, f->dst, 16);
	} else {
		__builtin_memcpy(&fib->ipv4_src, f->src, 4);
		__builtin_memcpy(&fib->ipv4_dst, f->dst, 4);
	}
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0) == BPF_FIB_LKUP_RET_SUCCESS ? 0 : -1;
}

static __always_inline int send_out(struct xdp_md *ctx, const struct bpf_fib_lookup *fib)
{
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib->ifindex, 0);
}

// The headers of an IPv4 or IPv6 UDP datagram, parsed: offsets are constant (no IPv4 options, no
// IPv6 extension headers), so the verifier follows every access.
struct parsed {
	int v6;
	int l3_len;        // 20 or 40
	__u16 udp_len;     // UDP header + payload, from the UDP header
	struct flow f;     // as received
	__u8 tos;          // IPv4 TOS (IPv6: kept in the first word as is)
	__be16 ip_id;      // IPv4
	__be16 frag_off;   // IPv4 (DF kept)
	__be32 v6_first;   // IPv6 version / traffic class / flow label
	__be16 udp_csum;
};

// Returns 0 and fills `p` for a plain UDP datagram that lies whole in the frame, else -1.
static __always_inline int parse(void *data, void *end, struct parsed *p)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	struct udphdr *udp;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return -1;
		if (ip->version != 4 || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
			return -1;
		if (ip->frag_off & bpf_htons(0x3fff)) // more fragments, or an offset
			return -1;
		udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > end)
			return -1;
		p->v6 = 0;
		p->l3_len = sizeof(*ip);
		if (bpf_ntohs(ip->tot_len) != sizeof(*ip) + bpf_ntohs(udp->len))
			return -1;
		__builtin_memset(p->f.src, 0, 16);
		__builtin_memset(p->f.dst, 0, 16);
		__builtin_memcpy(p->f.src, &ip->saddr, 4);
		__builtin_memcpy(p->f.dst, &ip->daddr, 4);
		p->tos = ip->tos;
		p->ip_id = ip->id;
		p->frag_off = ip->frag_off;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return -1;
		if (ip6->version != 6 || ip6->nexthdr != IPPROTO_UDP)
			return -1;
		udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > end)
			return -1;
		p->v6 = 1;
		p->l3_len = sizeof(*ip6);
		if (bpf_ntohs(ip6->payload_len) != bpf_ntohs(udp->len))
			return -1;
		__builtin_memcpy(p->f.src, &ip6->saddr, 16);
		__builtin_memcpy(p->f.dst, &ip6->daddr, 16);
		__builtin_memcpy(&p->v6_first, ip6, 4);
	} else {
		return -1;
	}
	p->udp_len = bpf_ntohs(udp->len);
	if (p->udp_len < sizeof(*udp))
		return -1;
	// The whole datagram must be in the frame (a truncated one goes up and is dropped there).
	if ((void *)udp + p->udp_len > end)
		return -1;
	p->f.sport = udp->source;
	p->f.dport = udp->dest;
	p->udp_csum = udp->check;
	return 0;
}

// Writes Ethernet, IP and UDP headers for `out` at the frame's start; `udp_len` includes the UDP
// header. Returns -1 if the frame is too short (cannot happen after a successful adjust, but the
// verifier wants the check).
static __always_inline int write_headers(struct xdp_md *ctx, const struct parsed *in, const struct flow *out,
					 __u16 udp_len, __u16 udp_csum, const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	struct udphdr *udp;
	if (in->v6) {
		eth->h_proto = bpf_htons(ETH_P_IPV6);
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return -1;
		__builtin_memcpy(ip6, &in->v6_first, 4);
		ip6->payload_len = bpf_htons(udp_len);
		ip6->nexthdr = IPPROTO_UDP;
		ip6->hop_limit = OUT_TTL;
		__builtin_memcpy(&ip6->saddr, out->src, 16);
		__builtin_memcpy(&ip6->daddr, out->dst, 16);
		udp = (void *)(ip6 + 1);
	} else {
		eth->h_proto = bpf_htons(ETH_P_IP);
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return -1;
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = in->tos;
		ip->tot_len = bpf_htons(sizeof(*ip) + udp_len);
		ip->id = in->ip_id;
		ip->frag_off = in->frag_off;
		ip->ttl = OUT_TTL;
		ip->protocol = IPPROTO_UDP;
		ip->check = 0;
		__builtin_memcpy(&ip->saddr, out->src, 4);
		__builtin_memcpy(&ip->daddr, out->dst, 4);
		ip->check = ipv4_csum(ip);
		udp = (void *)(ip + 1);
	}
	if ((void *)(udp + 1) > end)
		return -1;
	udp->source = out->sport;
	udp->dest = out->dport;
	udp->len = bpf_htons(udp_len);
	udp->check = udp_csum;
	return 0;
}

// Sum of what both directions take out of or put into the UDP checksum: the pseudo-header addresses
// and length, and the UDP ports and length (the protocol word does not change).
static __always_inline __u32 sum_endpoints(__u32 sum, const struct flow *f, __u16 udp_len, int v6, int sign)
{
	int words = v6 ? 8 : 2;
	sum = sum_addr(sum, f->src, words, sign);
	sum = sum_addr(sum, f->dst, words, sign);
	sum = sum_word(sum, bpf_htons(udp_len), sign); // pseudo-header length
	sum = sum_word(sum, f->sport, sign);
	sum = sum_word(sum, f->dport, sign);
	sum = sum_word(sum, bpf_htons(udp_len), sign); // UDP header length
	return sum;
}

// The UDP checksum of `p` sent as `out` with UDP length `new_udp_len`: the endpoints' words swapped,
// and the ChannelData header (`channel`, `data_len`) taken out (`header_sign` 0) or put in (1). An
// IPv4 datagram without a checksum (0, allowed there) stays without one.
static __always_inline __u16 new_udp_csum(const struct parsed *p, const struct flow *out, __u16 new_udp_len,
					  __be16 channel, __u16 data_len, int header_sign)
{
	if (p->udp_csum == 0 && !p->v6)
		return 0;
	__u32 sum = (__u16)~p->udp_csum;
	sum = sum_endpoints(sum, &p->f, p->udp_len, p->v6, 0);
	sum = sum_word(sum, channel, header_sign);
	sum = sum_word(sum, bpf_htons(data_len), header_sign);
	sum = sum_endpoints(sum, out, new_udp_len, p->v6, 1);
	return finish_udp_csum(sum);
}

// Resolves `out`'s route (see `route`), counting an installed channel's datagram that goes up for
// want of one.
static __always_inline int route_or_count(struct xdp_md *ctx, const struct flow *out, const struct parsed *p,
					  __u16 new_udp_len, struct bpf_fib_lookup *fib)
{
	if (route(ctx, out, p->v6, p->l3_len + new_udp_len, fib) < 0) {
		count(STAT_NO_ROUTE);
		return -1;
	}
	return 0;
}

// client -> server ChannelData for an installed channel: strip the 4-byte header, send the payload
// to the peer from the relayed address. Returns -1 to leave the datagram to user space.
static __noinline int client_to_peer(struct xdp_md *ctx, struct parsed *p, __be16 channel, __u16 data_len)
{
	struct channel_key key = {};
	__builtin_memcpy(key.client_ip, p->f.src, 16);
	key.client_port = p->f.sport;
	key.server_port = p->f.dport;
	key.channel = channel;
	key.family = p->v6 ? 6 : 4;
	struct channel_value *v = bpf_map_lookup_elem(&channels, &key);
	if (!v)
		return -1;
	if (v->server_ip_known) {
		if (!same_ip(v->server_ip, p->f.dst))
			return -1;
	} else {
		__builtin_memcpy(v->server_ip, p->f.dst, 16);
		v->server_ip_known = 1;
	}
	struct flow out;
	__builtin_memcpy(out.src, v->relay_ip, 16);
	__builtin_memcpy(out.dst, v->peer_ip, 16);
	out.sport = v->relay_port;
	out.dport = v->peer_port;
	__u16 new_udp_len = sizeof(struct udphdr) + data_len;
	struct bpf_fib_lookup fib;
	if (route_or_count(ctx, &out, p, new_udp_len, &fib) < 0)
		return -1;
	__u16 csum = new_udp_csum(p, &out, new_udp_len, channel, data_len, 0);
	// The payload stays where it is (an even shift keeps its words, and so its sum); the headers
	// move 4 bytes forward over the ChannelData header.
	if (bpf_xdp_adjust_head(ctx, 4) < 0)
		return -1;
	if (write_headers(ctx, p, &out, new_udp_len, csum, &fib) < 0)
		return XDP_DROP; // the frame changed under us: it is no longer the client's datagram
	__sync_fetch_and_add(&v->to_peer_packets, 1);
	__sync_fetch_and_add(&v->to_peer_bytes, data_len);
	count(STAT_TO_PEER);
	return send_out(ctx, &fib);
}

// peer -> relayed address for an installed channel: prepend the ChannelData header and send it to
// the client from the listening address. Returns -1 to leave the datagram to user space.
static __noinline int peer_to_client(struct xdp_md *ctx, struct parsed *p)
{
	struct peer_key pk = {};
	__builtin_memcpy(pk.peer_ip, p->f.src, 16);
	__builtin_memcpy(pk.relay_ip, p->f.dst, 16);
	pk.peer_port = p->f.sport;
	pk.relay_port = p->f.dport;
	pk.family = p->v6 ? 6 : 4;
	struct channel_key *ck = bpf_map_lookup_elem(&peers, &pk);
	if (!ck)
		return -1;
	struct channel_key key = *ck;
	struct channel_value *v = bpf_map_lookup_elem(&channels, &key);
	if (!v || !v->server_ip_known)
		return -1;
	__u16 data_len = p->udp_len - sizeof(struct udphdr);
	if (data_len > 0xffff - 64)
		return -1;
	struct flow out;
	__builtin_memcpy(out.src, v->server_ip, 16);
	__builtin_memcpy(out.dst, key.client_ip, 16);
	out.sport = key.server_port;
	out.dport = key.client_port;
	__u16 new_udp_len = p->udp_len + 4;
	struct bpf_fib_lookup fib;
	// tot_len makes the lookup refuse a datagram the egress MTU cannot carry (it goes up instead).
	if (route_or_count(ctx, &out, p, new_udp_len, &fib) < 0)
		return -1;
	__u16 csum = new_udp_csum(p, &out, new_udp_len, key.channel, data_len, 1);
	if (bpf_xdp_adjust_head(ctx, -4) < 0)
		return -1;
	if (write_headers(ctx, p, &out, new_udp_len, csum, &fib) < 0)
		return XDP_DROP;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 *hdr = data + sizeof(struct ethhdr) + (p->v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) +
		    sizeof(struct udphdr);
	if ((void *)(hdr + 4) > end)
		return XDP_DROP;
	__be16 len_be = bpf_htons(data_len);
	__builtin_memcpy(hdr, &key.channel, 2);
	__builtin_memcpy(hdr + 2, &len_be, 2);
	__sync_fetch_and_add(&v->to_client_packets, 1);
	__sync_fetch_and_add(&v->to_client_bytes, data_len);
	count(STAT_TO_CLIENT);
	return send_out(ctx, &fib);
}

SEC("xdp")
int turnpike_relay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct parsed p;
	if (parse(data, end, &p) < 0)
		return XDP_PASS;
	__u8 *payload = data + sizeof(struct ethhdr) + (p.v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) +
			sizeof(struct udphdr);
	// ChannelData: channel numbers 0x4000-0x7FFF, then the length of exactly what follows (padding,
	// which only stream transports need, sends it up).
	if (p.udp_len >= sizeof(struct udphdr) + 4 && (void *)(payload + 4) <= end && payload[0] >= 0x40 &&
	    payload[0] <= 0x7f) {
		__be16 channel, len_be;
		__builtin_memcpy(&channel, payload, 2);
		__builtin_memcpy(&len_be, payload + 2, 2);
		__u16 data_len = bpf_ntohs(len_be);
		if (sizeof(struct udphdr) + 4 + data_len == p.udp_len) {
			int rc = client_to_peer(ctx, &p, channel, data_len);
			if (rc >= 0)
				return rc;
			// Not an installed channel: a peer's datagram may look like ChannelData too.
		}
	}
	int rc = peer_to_client(ctx, &p);
	return rc >= 0 ? rc : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
