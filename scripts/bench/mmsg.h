/* Shared by the benchmark's C baselines (raw-forwarder.c, setup-floor.c). */
#ifndef TURNPIKE_BENCH_MMSG_H
#define TURNPIKE_BENCH_MMSG_H
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Points `n` receive headers at buffers `bufs` (`size` bytes each, back to back) and source addresses
 * `from`, ready for one recvmmsg call. */
static inline void prepare_recv_batch(struct mmsghdr *msgs, struct iovec *iov, void *bufs, size_t size,
                                      struct sockaddr_in *from, int n) {
    memset(msgs, 0, sizeof *msgs * n);
    for (int i = 0; i < n; i++) {
        iov[i].iov_base = (char *)bufs + i * size;
        iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &from[i];
        msgs[i].msg_hdr.msg_namelen = sizeof from[i];
    }
}

/* The baseline's input socket: UDP on 127.0.0.1:`port` (`type`: SOCK_DGRAM, maybe | SOCK_NONBLOCK) with
 * a 4 MiB receive buffer, and a 4 MiB send buffer when `sends` (it answers from this socket). Exits on
 * failure. */
static inline int listen_loopback(const char *port, int type, int sends) {
    int in = socket(AF_INET, type, 0);
    int big = 4 << 20;
    setsockopt(in, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (sends) {
        setsockopt(in, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    }
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    inet_pton(AF_INET, "127.0.0.1", &local.sin_addr);
    if (in < 0 || bind(in, (struct sockaddr *)&local, sizeof local) != 0) {
        perror("bind");
        exit(1);
    }
    return in;
}
#endif
