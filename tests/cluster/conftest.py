"""Fixtures of the cluster tests."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(params=["builtin", pytest.param("etcd", marks=pytest.mark.slow)])
def lease_backend(request) -> str:
    """``[cluster]`` keys of each lease backend: the built-in election, and etcd (a real server
    from the ``etcd_server`` fixture, under a prefix of the test's own)."""
    if request.param == "builtin":
        return ""
    url = request.getfixturevalue("etcd_server").url
    return f'lease_backend = "etcd"\netcd_endpoints = ["{url}"]\netcd_prefix = "/fabricd/{uuid.uuid4().hex[:8]}/"\n'
