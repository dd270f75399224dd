"""The role template's double fork: a role waits for its intermediate to exit (so that it is the
daemon's child) by watching ``getppid()`` change from the intermediate's pid. That pid must be
the intermediate's own: read by the role after the fork, it is already the daemon's whenever
the intermediate exited first, and the role then waited ``REPARENT_TIMEOUT_S`` (5 s) for a
change that had already happened: a role start 5 s late, about one in four on a busy machine."""

from __future__ import annotations

import os
import socket
import time

import pytest

from fabricd.roles import template

from ..conftest import in_forked_child

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _daemon(out) -> None:
    """A stand-in daemon (a child subreaper, like the real one): forks a role through the
    template's double fork, with the role held back until its intermediate has exited."""
    try:
        assert template.set_child_subreaper(True)
        real_fork, depth = os.fork, [0]

        def fork() -> int:
            child = real_fork()
            if child == 0:
                depth[0] += 1
                if depth[0] == 2:  # the role: let the intermediate exit and be reaped first
                    time.sleep(0.3)
            return child

        r, w = os.pipe()

        def become_role(args_json: str, sock: socket.socket, middle: int) -> None:  # in the role
            os.write(w, f"{middle} {os.getppid()}".encode())
            os._exit(0)

        os.fork, template._become_role = fork, become_role
        a, b = socket.socketpair()
        role = template._fork_role("{}", a)
        os.close(w)
        said = os.read(r, 100).decode()
        os.waitpid(role, 0)  # re-parented to us: ours to reap
        middle, parent = map(int, said.split())
        out.put((os.getpid(), middle, parent))
    except BaseException as e:  # reported to the test
        out.put(repr(e))


def test_a_role_waits_on_its_intermediates_pid_even_when_the_intermediate_exited_first():
    got = in_forked_child(_daemon, timeout=30)
    assert isinstance(got, tuple), got
    daemon, middle, parent = got
    assert parent == daemon, "the role was re-parented to the daemon before it looked"
    assert middle not in (daemon, 1), f"the role would wait for its parent to stop being {middle}"
