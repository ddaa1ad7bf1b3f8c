/* The kernel's limit for one core: receive UDP datagrams in batches (recvmmsg) on one socket and send
 * them in batches (sendmmsg) to one fixed destination. No parsing, no state. Built and run by
 * scripts/bench/bench-compare.sh as the baseline turnpike and coturn are compared against.
 *
 * With SOCKETS > 1 it sends through that many sockets, one per source (by source port, first come first
 * served, wrapping around): the shape of TURN relaying, where every allocation's data must leave from
 * its own relayed address. Each batch goes out with one sendmmsg per socket it touches.
 *
 * With the word `wait` after SOCKETS it also waits the way a relay must: a relay's peers may send to any
 * of its relay sockets at any time, so it cannot block reading one socket; it waits on all of them with
 * epoll_wait (level-triggered) and then reads the ready ones (datagrams on the output sockets are read
 * and dropped). This is the least any TURN server pays for the traffic of the benchmark.
 *
 * With RAW_COALESCE_US=N in the environment it pauses N microseconds after a batch that emptied the
 * input (fewer than BATCH datagrams) and held at least two: receive coalescing as turnpike's shards do
 * it (src/shard/coalesce.rs, with a fixed pause), to compare like with like (bench/README.md).
 *
 * With RAW_SEND=1 in the environment (and SOCKETS > 1) it sends every batch through one IPPROTO_RAW
 * socket in one sendmmsg, each datagram with an IPv4 and UDP header (UDP checksum computed) naming its
 * output socket's address as the source: what turnpike's shards do with runtime.raw_send
 * (src/shard/rawsend.rs). The output sockets stay bound, as relay sockets do. Needs CAP_NET_RAW.
 *
 * Usage: raw-forwarder LISTEN_PORT DEST_IP DEST_PORT [SOCKETS [wait]] */
#define _GNU_SOURCE
#include "mmsg.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32
#define SIZE 2048
#define MAX_SOCKETS 4096

/* One's complement sum of `len` bytes as big-endian 16-bit words, added to `sum`. */
static unsigned long csum_add(unsigned long sum, const unsigned char *p, size_t len) {
    for (; len > 1; p += 2, len -= 2) sum += (unsigned long)(p[0] << 8 | p[1]);
    if (len) sum += (unsigned long)(p[0] << 8);
    return sum;
}

/* Writes the IPv4 and UDP headers (28 bytes) of a datagram of `len` payload bytes from `src` to `dst`
 * into `h`, with the UDP checksum over `payload`; the kernel fills the IP identification and checksum. */
static void raw_header(unsigned char *h, const struct sockaddr_in *src, const struct sockaddr_in *dst,
                       const unsigned char *payload, size_t len) {
    unsigned short total = htons((unsigned short)(len + 28)), udp_len = htons((unsigned short)(len + 8));
    memset(h, 0, 28);
    h[0] = 0x45;
    h[8] = 64;
    h[9] = IPPROTO_UDP;
    memcpy(h + 2, &total, 2);
    memcpy(h + 12, &src->sin_addr, 4);
    memcpy(h + 16, &dst->sin_addr, 4);
    memcpy(h + 20, &src->sin_port, 2);
    memcpy(h + 22, &dst->sin_port, 2);
    memcpy(h + 24, &udp_len, 2);
    unsigned long sum = csum_add(0, h + 12, 8) + IPPROTO_UDP + len + 8;
    sum = csum_add(sum, h + 20, 8);
    sum = csum_add(sum, payload, len);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    unsigned short c = (unsigned short)~sum;
    c = htons(c ? c : 0xffff);
    memcpy(h + 26, &c, 2);
}

static int out_socket(void) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    int big = 4 << 20;
    setsockopt(s, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    struct sockaddr_in any = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &any.sin_addr);
    if (s < 0 || bind(s, (struct sockaddr *)&any, sizeof any) != 0) {
        perror("out socket");
        exit(1);
    }
    return s;
}

int main(int argc, char **argv) {
    if (argc < 4 || argc > 6 || (argc == 6 && strcmp(argv[5], "wait") != 0)) {
        fprintf(stderr, "usage: %s LISTEN_PORT DEST_IP DEST_PORT [SOCKETS [wait]]\n", argv[0]);
        return 2;
    }
    int nsock = argc >= 5 ? atoi(argv[4]) : 1;
    int wait_all = argc == 6;
    if (nsock < 1 || nsock > MAX_SOCKETS) {
        fprintf(stderr, "SOCKETS must be 1..%d\n", MAX_SOCKETS);
        return 2;
    }
    int in = listen_loopback(argv[1], SOCK_DGRAM, 0);
    static int outs[MAX_SOCKETS];
    for (int i = 0; i < nsock; i++) outs[i] = out_socket();
    /* In `wait` mode: one epoll set over the input socket (data = nsock) and every output socket. */
    int ep = -1;
    if (wait_all) {
        ep = epoll_create1(0);
        for (int i = 0; i <= nsock; i++) {
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, i == nsock ? in : outs[i], &ev) != 0) {
                perror("epoll_ctl");
                return 1;
            }
        }
    }
    struct epoll_event ready[64];
    char discard[SIZE];
    /* Socket of each source port (sources are on loopback), -1 until first seen. */
    static short slot_of_port[65536];
    memset(slot_of_port, 0xff, sizeof slot_of_port);
    int next_slot = 0;
    struct sockaddr_in dest = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &dest.sin_addr);
    static char bufs[BATCH][SIZE];
    struct sockaddr_in from[BATCH];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH], group[BATCH];
    int slot[BATCH];
    const char *coalesce = getenv("RAW_COALESCE_US");
    long pause_us = coalesce ? atol(coalesce) : 0;
    if (pause_us > 0) prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    /* RAW_SEND: the raw socket, and each output socket's address (the source of its datagrams). */
    int raw_fd = -1;
    static struct sockaddr_in out_addr[MAX_SOCKETS];
    static unsigned char hdr[BATCH][28];
    static struct iovec riov[BATCH][2];
    static struct mmsghdr rmsgs[BATCH];
    const char *raw_send = getenv("RAW_SEND");
    if (raw_send && strcmp(raw_send, "1") == 0) {
        raw_fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
        int big = 4 << 20;
        if (raw_fd < 0 || setsockopt(raw_fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big) != 0) {
            perror("raw socket (RAW_SEND needs CAP_NET_RAW)");
            return 1;
        }
        for (int i = 0; i < nsock; i++) {
            socklen_t len = sizeof out_addr[i];
            getsockname(outs[i], (struct sockaddr *)&out_addr[i], &len);
        }
    }
    int last = 0;
    for (;;) {
        if (pause_us > 0 && last >= 2 && last < BATCH) {
            struct timespec pause = {pause_us / 1000000, (pause_us % 1000000) * 1000};
            nanosleep(&pause, NULL);
        }
        last = 0;
        prepare_recv_batch(msgs, iov, bufs, SIZE, from, BATCH);
        int n;
        if (wait_all) {
            int input_ready = 0;
            int nready = epoll_wait(ep, ready, 64, -1);
            for (int e = 0; e < nready; e++) {
                if (ready[e].data.u32 == (unsigned)nsock)
                    input_ready = 1;
                else
                    while (recv(outs[ready[e].data.u32], discard, sizeof discard, MSG_DONTWAIT) > 0) {}
            }
            if (!input_ready) continue;
            n = recvmmsg(in, msgs, BATCH, MSG_DONTWAIT, NULL);
        } else {
            n = recvmmsg(in, msgs, BATCH, MSG_WAITFORONE, NULL);
        }
        if (n <= 0) continue;
        last = n;
        for (int i = 0; i < n; i++) {
            unsigned short port = ntohs(from[i].sin_port);
            if (slot_of_port[port] < 0) {
                slot_of_port[port] = (short)next_slot;
                next_slot = (next_slot + 1) % nsock;
            }
            slot[i] = slot_of_port[port];
            iov[i].iov_len = msgs[i].msg_len;
            msgs[i].msg_hdr.msg_name = &dest;
            msgs[i].msg_hdr.msg_namelen = sizeof dest;
        }
        if (raw_fd >= 0) {
            /* Every datagram of the batch through the raw socket, in one call, in order. */
            for (int i = 0; i < n; i++) {
                raw_header(hdr[i], &out_addr[slot[i]], &dest, (unsigned char *)bufs[i], msgs[i].msg_len);
                riov[i][0] = (struct iovec){.iov_base = hdr[i], .iov_len = 28};
                riov[i][1] = (struct iovec){.iov_base = bufs[i], .iov_len = msgs[i].msg_len};
                rmsgs[i].msg_hdr = (struct msghdr){
                    .msg_name = &dest, .msg_namelen = sizeof dest, .msg_iov = riov[i], .msg_iovlen = 2};
            }
            sendmmsg(raw_fd, rmsgs, n, 0);
            continue;
        }
        /* One sendmmsg per socket, in order of first appearance; order per socket is kept. */
        for (int i = 0; i < n; i++) {
            if (slot[i] < 0) continue;
            int s = slot[i], count = 0;
            for (int j = i; j < n; j++) {
                if (slot[j] == s) {
                    group[count++] = msgs[j];
                    slot[j] = -1;
                }
            }
            sendmmsg(outs[s], group, count, 0);
        }
    }
}
