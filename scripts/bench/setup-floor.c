/* The kernel's part of setting up TURN allocations over UDP: the least any server pays per Allocate
 * when every allocation gets its own relay socket. Built and run by scripts/bench/bench-compare.sh as the
 * baseline of the allocations-per-second figure, like raw-forwarder.c is for relaying.
 *
 * It answers the load generator's requests (loadgen --setup-only) with STUN messages of the sizes
 * turnpike sends, but checks nothing and computes nothing: no credentials, no HMAC (the
 * MESSAGE-INTEGRITY it sends is zeros; the generator does not check it), no allocation state beyond
 * the socket. What it does do is what the kernel must do for a relay:
 *   - requests arrive in batches (recvmmsg) and answers leave in batches (sendmmsg), one socket;
 *   - an Allocate carrying MESSAGE-INTEGRITY gets a relay socket: socket(), bind() to the next port of
 *     RELAY_MIN..RELAY_MAX (skipping ports in use), and epoll_ctl(ADD), since a relay must wait for
 *     its peers on all of its sockets (the loop waits in epoll_wait like a relay's);
 *   - a Refresh with LIFETIME 0 closes that socket (close() also leaves the epoll set).
 * An Allocate without MESSAGE-INTEGRITY gets a 401 with REALM and NONCE; other requests a success.
 * Relay sockets are keyed by the client's source port (the generator's clients are all on 127.0.0.1).
 *
 * Usage: setup-floor LISTEN_PORT [RELAY_MIN RELAY_MAX]   (default relay range 20000-39999; prints the
 * address it listens on, so that LISTEN_PORT 0 can be used) */
#define _GNU_SOURCE
#include "mmsg.h"
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 32
#define SIZE 2048
#define ANSWER 128
#define COOKIE 0x2112A442u
#define BIND_ATTEMPTS 16

static int relay_fd[65536];
static unsigned relay_port[65536];

static void put16(uint8_t *p, unsigned v) {
    p[0] = v >> 8;
    p[1] = v;
}

static void put32(uint8_t *p, uint32_t v) {
    put16(p, v >> 16);
    put16(p + 2, v & 0xffff);
}

/* Appends an attribute of `len` bytes (value left as it is in `msg`, zeroed) and returns its value. */
static uint8_t *attr(uint8_t *msg, size_t *at, unsigned type, unsigned len) {
    uint8_t *a = msg + *at;
    put16(a, type);
    put16(a + 2, len);
    memset(a + 4, 0, (len + 3) & ~3u);
    *at += 4 + ((len + 3) & ~3u);
    return a + 4;
}

/* XOR-MAPPED-ADDRESS / XOR-RELAYED-ADDRESS value for 127.0.0.1:port. */
static void xor_addr(uint8_t *v, unsigned port) {
    v[1] = 1;
    put16(v + 2, port ^ (COOKIE >> 16));
    put32(v + 4, 0x7f000001u ^ COOKIE);
}

/* Finds attribute `type` in the request; returns its value and length, or NULL. */
static const uint8_t *find(const uint8_t *req, size_t len, unsigned type, unsigned *vlen) {
    size_t at = 20;
    while (at + 4 <= len) {
        unsigned t = req[at] << 8 | req[at + 1], l = req[at + 2] << 8 | req[at + 3];
        if (at + 4 + l > len) {
            return NULL;
        }
        if (t == type) {
            *vlen = l;
            return req + at + 4;
        }
        at += 4 + ((l + 3) & ~3u);
    }
    return NULL;
}

/* Opens, binds and registers a relay socket for client port `client`; false when none could be had. */
static int open_relay(unsigned client, int ep, unsigned *next, unsigned lo, unsigned hi) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (s < 0) {
        return 0;
    }
    for (int i = 0; i < BIND_ATTEMPTS; i++) {
        unsigned port = *next;
        *next = port >= hi ? lo : port + 1;
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        a.sin_addr.s_addr = htonl(0x7f000001u);
        if (bind(s, (struct sockaddr *)&a, sizeof a) == 0) {
            struct epoll_event ev = {.events = EPOLLIN, .data.fd = s};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) != 0) {
                break;
            }
            relay_fd[client] = s;
            relay_port[client] = port;
            return 1;
        }
        if (errno != EADDRINUSE) {
            break;
        }
    }
    close(s);
    return 0;
}

/* Writes the answer to `req` (from client port `client`) into `out`; returns its length (0: none). */
static size_t answer(const uint8_t *req, size_t len, unsigned client, uint8_t *out, int ep, unsigned *next,
                     unsigned lo, unsigned hi) {
    if (len < 20 || (req[0] & 0xC0) != 0 || (req[4] << 24 | req[5] << 16 | req[6] << 8 | req[7]) != (int)COOKIE) {
        return 0;
    }
    unsigned type = req[0] << 8 | req[1];
    if ((type & 0x0110) != 0) {
        return 0; /* not a request */
    }
    unsigned method = type & 0x3EEF, vlen = 0;
    int signed_req = find(req, len, 0x0008, &vlen) != NULL;
    memcpy(out + 4, req + 4, 16); /* cookie and transaction ID */
    size_t at = 20;
    if (method == 0x0003 && !signed_req) {
        put16(out, 0x0113);
        uint8_t *err = attr(out, &at, 0x0009, 16);
        err[2] = 4;
        err[3] = 1;
        memcpy(err + 4, "Unauthorized", 12);
        memcpy(attr(out, &at, 0x0014, 5), "bench", 5);
        memset(attr(out, &at, 0x0015, 20), 'n', 20);
    } else {
        put16(out, method | 0x0100);
        if (method == 0x0003) {
            if (relay_fd[client] < 0 && !open_relay(client, ep, next, lo, hi)) {
                return 0;
            }
            xor_addr(attr(out, &at, 0x0016, 8), relay_port[client]);
            put32(attr(out, &at, 0x000D, 4), 600);
            xor_addr(attr(out, &at, 0x0020, 8), client);
        } else if (method == 0x0004) {
            const uint8_t *life = find(req, len, 0x000D, &vlen);
            int zero = life && vlen == 4 && !(life[0] | life[1] | life[2] | life[3]);
            if (zero && relay_fd[client] >= 0) {
                close(relay_fd[client]);
                relay_fd[client] = -1;
            }
            put32(attr(out, &at, 0x000D, 4), zero ? 0 : 600);
        }
        attr(out, &at, 0x0008, 20);
    }
    put16(out + 2, at - 20);
    return at;
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 4) {
        fprintf(stderr, "usage: %s LISTEN_PORT [RELAY_MIN RELAY_MAX]\n", argv[0]);
        return 2;
    }
    unsigned lo = argc == 4 ? atoi(argv[2]) : 20000, hi = argc == 4 ? atoi(argv[3]) : 39999, next = lo;
    if (lo < 1 || hi > 65535 || lo > hi) {
        fprintf(stderr, "bad relay range\n");
        return 2;
    }
    memset(relay_fd, -1, sizeof relay_fd);
    int in = listen_loopback(argv[1], SOCK_DGRAM | SOCK_NONBLOCK, 1);
    struct sockaddr_in local;
    socklen_t local_len = sizeof local;
    getsockname(in, (struct sockaddr *)&local, &local_len);
    printf("listening on 127.0.0.1:%u\n", ntohs(local.sin_port)); /* LISTEN_PORT 0 takes a free one */
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = in};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, in, &ev) != 0) {
        perror("epoll");
        return 1;
    }
    static uint8_t bufs[BATCH][SIZE], outs[BATCH][ANSWER];
    struct mmsghdr msgs[BATCH], replies[BATCH];
    struct iovec iov[BATCH], out_iov[BATCH];
    struct sockaddr_in from[BATCH];
    struct epoll_event ready[64];
    for (;;) {
        int n_ready = epoll_wait(ep, ready, 64, -1);
        for (int e = 0; e < n_ready; e++) {
            int fd = ready[e].data.fd;
            if (fd != in) {
                char drop[SIZE];
                while (recv(fd, drop, sizeof drop, 0) >= 0) {
                }
                continue;
            }
            for (;;) {
                prepare_recv_batch(msgs, iov, bufs, SIZE, from, BATCH);
                int n = recvmmsg(in, msgs, BATCH, MSG_DONTWAIT, NULL);
                if (n <= 0) {
                    break;
                }
                int k = 0;
                for (int i = 0; i < n; i++) {
                    size_t len = answer(bufs[i], msgs[i].msg_len, ntohs(from[i].sin_port), outs[k], ep, &next, lo, hi);
                    if (len == 0) {
                        continue;
                    }
                    out_iov[k].iov_base = outs[k];
                    out_iov[k].iov_len = len;
                    memset(&replies[k], 0, sizeof replies[k]);
                    replies[k].msg_hdr.msg_iov = &out_iov[k];
                    replies[k].msg_hdr.msg_iovlen = 1;
                    replies[k].msg_hdr.msg_name = &from[i];
                    replies[k].msg_hdr.msg_namelen = sizeof from[i];
                    k++;
                }
                for (int sent = 0; sent < k;) {
                    int r = sendmmsg(in, replies + sent, k - sent, 0);
                    if (r <= 0) {
                        break;
                    }
                    sent += r;
                }
                if (n < BATCH) {
                    break;
                }
            }
        }
    }
}
