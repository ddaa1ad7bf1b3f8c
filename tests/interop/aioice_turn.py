"""Allocates through turnpike with aioice's TURN client and relays a datagram round trip to a local
echo peer. Usage: aioice_turn.py HOST PORT USERNAME PASSWORD [udp|tcp]. Prints OK and exits 0 on success."""

import asyncio
import sys

from aioice import turn


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
        self.seen_from = []

    def datagram_received(self, data, addr):
        self.seen_from.append(addr)
        self.transport.sendto(b"echo:" + data, addr)


class Collect(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait((data, addr))


async def main(host, port, username, password, transport):
    loop = asyncio.get_running_loop()
    peer_transport, peer = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer_addr = peer_transport.get_extra_info("sockname")
    transport, client = await turn.create_turn_endpoint(
        Collect, server_addr=(host, port), username=username, password=password, lifetime=600,
        transport=transport,
    )
    relayed = transport.get_extra_info("sockname")
    print("relayed address", relayed)
    for i in range(3):
        payload = f"hello {i}".encode()
        transport.sendto(payload, peer_addr)
        data, addr = await asyncio.wait_for(client.queue.get(), 5)
        assert data == b"echo:" + payload, data
        assert tuple(addr) == tuple(peer_addr), addr
    assert all(tuple(a) == tuple(relayed) for a in peer.seen_from), (peer.seen_from, relayed)
    transport.close()
    await asyncio.sleep(0.2)
    peer_transport.close()
    print("OK")


if __name__ == "__main__":
    h, p, u, w = sys.argv[1:5]
    t = sys.argv[5] if len(sys.argv) > 5 else "udp"
    asyncio.run(asyncio.wait_for(main(h, int(p), u, w, t), 30))
