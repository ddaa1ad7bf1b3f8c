/* The ceiling for an XDP fast path of ChannelData (bench/README.md, "Kernel path"): a bare XDP program
 * that does the per-packet work of a relay's kernel path minus its table lookups. Built and attached by
 * scripts/bench/bench_kernel.py (clang -O2 -target bpf); the load generator drives it with `--raw`.
 *
 * For an IPv4 UDP datagram to REFLECT_ADDR:REFLECT_PORT (ihl 5, not a fragment) it
 *   - rewrites the addresses and ports: source NEW_SADDR:NEW_SPORT (as a relay's relayed address),
 *     destination NEW_DADDR:NEW_DPORT (as the peer of a channel),
 *   - updates the IPv4 header checksum incrementally (RFC 1624), and the UDP checksum too with
 *     -DUDP_CSUM_INCREMENTAL (a zero one stays zero), else sets it to 0 (no checksum, allowed for IPv4).
 *     On veth a datagram sent by a local socket arrives, when the sender's veth offloads transmit
 *     checksums (the default), with a partial checksum (CHECKSUM_PARTIAL: the pseudo-header's sum only),
 *     which an incremental update turns into a wrong one: the receiver drops the datagram
 *     (UdpInCsumErrors). bench_kernel.py switches that offload off on the generator's side and updates;
 *   - asks the kernel's FIB for the egress interface and the MAC addresses (bpf_fib_lookup): with
 *     OUT_IFINDEX defined as a datagram sent from NEW_SADDR's interface (BPF_FIB_LOOKUP_OUTPUT, whose
 *     `ifindex` restricts the route to that interface, so the ingress interface will not do), without
 *     it as a datagram forwarded from the ingress interface (flags 0). Either way the kernel answers
 *     BPF_FIB_LKUP_RET_FWD_DISABLED unless net.ipv4.conf.<the ifindex's interface>.forwarding is 1
 *     (checked before the flags, Linux 6.18), and the datagram is passed up; and
 *   - sends it on: XDP_TX when that interface is the one it came in on, bpf_redirect otherwise.
 * No map, no channel or allocation lookup, no ChannelData header to strip. Everything else, and a
 * datagram whose route or neighbour is not resolved, is XDP_PASS (untouched).
 *
 * Configuration at compile time (-D), addresses as host-order integers:
 *   REFLECT_ADDR, REFLECT_PORT   what to reflect (destination address and UDP port)
 *   NEW_SADDR, NEW_SPORT         the new source
 *   NEW_DADDR, NEW_DPORT         the new destination
 *   OUT_IFINDEX (optional)       the index of the interface holding NEW_SADDR (see above)
 *   UDP_CSUM_INCREMENTAL         update the UDP checksum instead of zeroing it (see above)
 * With -DPASS_ONLY the object holds a program that passes every frame (XDP_PASS): attached to the
 * generator's ends of the veth pairs in every configuration, because a veth receives frames sent with
 * XDP_TX or bpf_redirect only when its peer has an XDP program (it then runs the receive NAPI).
 *
 * Attach: ip -n NS link set dev IF xdp obj xdp-reflector.o sec xdp */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

#ifdef PASS_ONLY

SEC("xdp")
int xdp_pass(struct xdp_md *ctx) {
    return XDP_PASS;
}

#else

#if !defined(REFLECT_ADDR) || !defined(REFLECT_PORT) || !defined(NEW_SADDR) || !defined(NEW_SPORT) || \
    !defined(NEW_DADDR) || !defined(NEW_DPORT)
#error "define REFLECT_ADDR, REFLECT_PORT, NEW_SADDR, NEW_SPORT, NEW_DADDR and NEW_DPORT (see the top of the file)"
#endif

static __always_inline __u16 csum_fold(__u32 sum) {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)~sum;
}

/* RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m'), for a 32-bit field changing from `from` to `to` (both as
 * stored in the packet: one's complement sums do not depend on the byte order). */
static __always_inline void csum_replace4(__u16 *sum, __u32 from, __u32 to) {
    __u32 s = (__u16)~*sum;
    s += (~from >> 16) + (~from & 0xffff) + (to >> 16) + (to & 0xffff);
    *sum = csum_fold(s);
}

SEC("xdp")
int xdp_reflect(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end)
        return XDP_PASS;
    if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->protocol != IPPROTO_UDP ||
        (ip->frag_off & bpf_htons(0x3fff)) != 0)
        return XDP_PASS;
    if (ip->daddr != bpf_htonl(REFLECT_ADDR) || udp->dest != bpf_htons(REFLECT_PORT))
        return XDP_PASS;

    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    fib.tot_len = bpf_ntohs(ip->tot_len);
    fib.ipv4_src = bpf_htonl(NEW_SADDR);
    fib.ipv4_dst = bpf_htonl(NEW_DADDR);
    fib.sport = bpf_htons(NEW_SPORT);
    fib.dport = bpf_htons(NEW_DPORT);
#ifdef OUT_IFINDEX
    fib.ifindex = OUT_IFINDEX; /* the lookup of a datagram sent from NEW_SADDR, which lives there */
    if (bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT) != BPF_FIB_LKUP_RET_SUCCESS)
        return XDP_PASS;
#else
    fib.ifindex = ctx->ingress_ifindex; /* a forwarding lookup: needs IP forwarding on that interface */
    if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
        return XDP_PASS;
#endif

#ifdef UDP_CSUM_INCREMENTAL
    if (udp->check != 0) {
        csum_replace4(&udp->check, ip->saddr, bpf_htonl(NEW_SADDR));
        csum_replace4(&udp->check, ip->daddr, bpf_htonl(NEW_DADDR));
        csum_replace4(&udp->check, *(__u32 *)&udp->source, (__u32)bpf_htons(NEW_SPORT) | ((__u32)bpf_htons(NEW_DPORT) << 16));
        if (udp->check == 0)
            udp->check = 0xffff;
    }
#else
    udp->check = 0;
#endif
    udp->source = bpf_htons(NEW_SPORT);
    udp->dest = bpf_htons(NEW_DPORT);
    csum_replace4(&ip->check, ip->saddr, bpf_htonl(NEW_SADDR));
    csum_replace4(&ip->check, ip->daddr, bpf_htonl(NEW_DADDR));
    ip->saddr = bpf_htonl(NEW_SADDR);
    ip->daddr = bpf_htonl(NEW_DADDR);
    __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
    if (fib.ifindex == ctx->ingress_ifindex)
        return XDP_TX;
    return bpf_redirect(fib.ifindex, 0);
}

#endif

char LICENSE[] SEC("license") = "GPL";
