"""The socket factory: every socket gets bounded queues, no linger, and the size limit; an
oversized message never reaches the reader."""

from __future__ import annotations

import pytest
import zmq

from fabric_client.sockets import SocketFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def test_options_are_applied():
    ctx = zmq.Context()
    try:
        f = SocketFactory(ctx, max_message_bytes=4096)
        router, dealer = f.router(hwm=10), f.dealer(linger_ms=50)
        assert router.getsockopt(zmq.MAXMSGSIZE) == 4096 and router.getsockopt(zmq.SNDHWM) == 10
        assert router.getsockopt(zmq.RCVHWM) == 10 and router.getsockopt(zmq.LINGER) == 0
        assert dealer.getsockopt(zmq.LINGER) == 50 and dealer.getsockopt(zmq.SNDHWM) == 1000
        router.close()
        dealer.close()
        with pytest.raises(ValueError):
            SocketFactory(ctx, max_message_bytes=0)
    finally:
        ctx.term()


def test_an_oversized_message_is_dropped_before_it_is_read():
    ctx = zmq.Context()
    try:
        server = SocketFactory(ctx, max_message_bytes=1024).router()
        port = server.bind_to_random_port("tcp://127.0.0.1")
        big, small = zmq.Context.instance().socket(zmq.DEALER), zmq.Context.instance().socket(zmq.DEALER)
        for s in (big, small):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://127.0.0.1:{port}")
        big.send(b"x" * 10_000)
        small.send(b"ok")
        assert server.poll(5000)
        _identity, body = server.recv_multipart()
        assert body == b"ok"
        assert not server.poll(300), "the oversized message was delivered"
        for s in (big, small, server):
            s.close()
    finally:
        ctx.term()
