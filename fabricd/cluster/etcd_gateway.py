"""A small client of etcd v3's JSON gRPC gateway: just what the etcd lease backend needs.

etcd (3.4 here) serves its v3 API as JSON on the client port: ``POST /v3/lease/grant``,
``/v3/lease/keepalive``, ``/v3/lease/revoke``, ``/v3/kv/range``, ``/v3/kv/txn``. Keys and values
are base64 in the JSON; 64-bit integers (lease ids, revisions) are JSON strings and fields at their
zero value are left out. Every call has a short timeout and raises :class:`EtcdError` on any
failure (connection, timeout, an HTTP or gRPC error, a reply that does not parse), so the caller
(a worker thread, never the daemon's loop) can count it and try again on its next cycle. With
several endpoints a failed call moves on to the next one for the following call.

Standard library only (``http.client``): the Python ``etcd3`` package does not work with current
protobuf releases.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fabricd.errors import FabricdError

__all__ = ["EtcdError", "EtcdGateway", "KeyValue", "prefix_end", "url_problem"]

#: Bytes of one reply we read at most: our keys are few and small.
MAX_REPLY_BYTES = 1 << 20


class EtcdError(FabricdError):
    """A call to etcd failed; names the endpoint, the call and why."""

    def __init__(self, endpoint: str, call: str, reason: str) -> None:
        self.endpoint, self.call, self.reason = endpoint, call, reason
        super().__init__(f"etcd {endpoint} {call}: {reason}")


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd returns it (``value`` decoded as UTF-8)."""

    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int


def url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable gateway endpoint (``http://host:port``), or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a URL: {e}"
    if parts.scheme != "http":
        return "expected http://host:port (https is not supported)"
    if not parts.hostname or port is None:
        return "expected http://host:port"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return "expected http://host:port with nothing after the port"
    return None


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that selects every key starting with ``prefix`` (etcd's convention:
    the prefix with its last byte plus one). Our prefixes end in ``/``, so this is ASCII."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _int(obj: dict, name: str) -> int:
    return int(obj.get(name, 0))


def _kv(obj: dict) -> KeyValue:
    return KeyValue(key=base64.b64decode(obj.get("key", "")).decode(errors="replace"),
                    value=base64.b64decode(obj.get("value", "")).decode(errors="replace"),
                    create_revision=_int(obj, "create_revision"), mod_revision=_int(obj, "mod_revision"),
                    lease=_int(obj, "lease"))


class EtcdGateway:
    """Calls to one etcd cluster through its JSON gateway; one call at a time (one thread)."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint is needed")
        for url in endpoints:
            problem = url_problem(url)
            if problem:
                raise ValueError(f"etcd endpoint {url!r}: {problem}")
        self.endpoints = tuple(endpoints)
        self.timeout_s = timeout_s
        self._current = 0
        self._conn: http.client.HTTPConnection | None = None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        endpoint = self.endpoint
        try:
            if self._conn is None:
                parts = urlsplit(endpoint)
                self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout_s)
            self._conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = self._conn.getresponse()
            raw = resp.read(MAX_REPLY_BYTES + 1)
        except (OSError, http.client.HTTPException) as e:
            self.close()
            self._current = (self._current + 1) % len(self.endpoints)
            raise EtcdError(endpoint, path, f"{type(e).__name__}: {e}") from e
        if len(raw) > MAX_REPLY_BYTES:
            self.close()
            raise EtcdError(endpoint, path, f"reply larger than {MAX_REPLY_BYTES} bytes")
        try:  # a streaming call (keepalive) answers one JSON object per line
            reply = json.loads(raw.split(b"\n", 1)[0] or b"{}")
        except ValueError as e:
            self.close()
            raise EtcdError(endpoint, path, f"HTTP {resp.status}: reply is not JSON: {raw[:200]!r}") from e
        if not isinstance(reply, dict):
            raise EtcdError(endpoint, path, f"HTTP {resp.status}: reply is not a JSON object: {raw[:200]!r}")
        error = reply.get("error") or (reply.get("result") or {}).get("error")
        if resp.status != 200 or error:
            raise EtcdError(endpoint, path, f"HTTP {resp.status}: {error or raw[:200]!r}")
        return reply

    # --- leases --------------------------------------------------------------------------------

    def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease of ``ttl_s`` seconds: (lease id, the TTL etcd granted)."""
        reply = self._call("/v3/lease/grant", {"TTL": ttl_s})
        lease = _int(reply, "ID")
        if not lease:
            raise EtcdError(self.endpoint, "/v3/lease/grant", f"no lease id in {reply!r}")
        return lease, _int(reply, "TTL")

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``: the TTL it has again, 0 when etcd no longer knows it (expired, revoked)."""
        return _int(self._call("/v3/lease/keepalive", {"ID": str(lease)}).get("result") or {}, "TTL")

    def revoke(self, lease: int) -> None:
        """End ``lease`` now: every key attached to it is deleted. A lease etcd no longer knows is fine."""
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "lease not found" not in e.reason:
                raise

    # --- keys ----------------------------------------------------------------------------------

    def range(self, key: str, range_end: str | None = None) -> tuple[int, list[KeyValue]]:
        """(the store's revision, the keys in [key, range_end) or just ``key``)."""
        body = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        reply = self._call("/v3/kv/range", body)
        return _int(reply.get("header") or {}, "revision"), [_kv(kv) for kv in reply.get("kvs", ())]

    def put(self, key: str, value: str, lease: int) -> int:
        """Write ``key`` attached to ``lease``; the store's new revision."""
        reply = self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease)})
        return _int(reply.get("header") or {}, "revision")

    def create(self, key: str, value: str, lease: int, *,
               unchanged_since: tuple[str, str, int] | None = None) -> tuple[bool, KeyValue | None]:
        """One transaction: if ``key`` is absent (and, with ``unchanged_since = (key, range_end,
        revision)``, no key of that range was written after ``revision``) put it attached to
        ``lease``; either way return (whether it was put, ``key`` as it is now)."""
        compare = [{"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}]
        if unchanged_since is not None:
            start, end, revision = unchanged_since
            compare.append({"key": _b64(start), "range_end": _b64(end), "target": "MOD", "result": "LESS",
                            "mod_revision": str(revision + 1)})
        read = {"request_range": {"key": _b64(key)}}
        reply = self._call("/v3/kv/txn", {
            "compare": compare,
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}, read],
            "failure": [read]})
        kvs = ((reply.get("responses") or [{}])[-1].get("response_range") or {}).get("kvs") or []
        return bool(reply.get("succeeded")), _kv(kvs[0]) if kvs else None

    def delete_if_created(self, key: str, create_revision: int) -> bool:
        """Delete ``key`` only if it is the one created at ``create_revision`` (ours); True if deleted."""
        reply = self._call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "CREATE", "result": "EQUAL",
                         "create_revision": str(create_revision)}],
            "success": [{"request_delete_range": {"key": _b64(key)}}]})
        return bool(reply.get("succeeded"))
