/* The kernel's limit for one core: receive UDP datagrams in batches (recvmmsg) on one socket and send
 * them in batches (sendmmsg) to one fixed destination. No parsing, no state. Built and run by
 * scripts/bench-compare.sh as the baseline turnpike and coturn are compared against.
 * Usage: raw-forwarder LISTEN_PORT DEST_IP DEST_PORT */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 32
#define SIZE 2048

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s LISTEN_PORT DEST_IP DEST_PORT\n", argv[0]);
        return 2;
    }
    int in = socket(AF_INET, SOCK_DGRAM, 0), out = socket(AF_INET, SOCK_DGRAM, 0);
    int big = 4 << 20;
    setsockopt(in, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    setsockopt(out, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &local.sin_addr);
    if (bind(in, (struct sockaddr *)&local, sizeof local) != 0) {
        perror("bind");
        return 1;
    }
    struct sockaddr_in dest = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &dest.sin_addr);
    static char bufs[BATCH][SIZE];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    for (;;) {
        memset(msgs, 0, sizeof msgs);
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = SIZE;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(in, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0) continue;
        for (int i = 0; i < n; i++) {
            iov[i].iov_len = msgs[i].msg_len;
            msgs[i].msg_hdr.msg_name = &dest;
            msgs[i].msg_hdr.msg_namelen = sizeof dest;
        }
        sendmmsg(out, msgs, n, 0);
    }
}
