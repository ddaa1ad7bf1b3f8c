/* Shared by the benchmark's C baselines (raw-forwarder.c, setup-floor.c). */
#ifndef TURNPIKE_BENCH_MMSG_H
#define TURNPIKE_BENCH_MMSG_H
#define _GNU_SOURCE
#include <netinet/in.h>
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
#endif
