"""Errors raised by the fabric client library (and by the wire protocol both sides share)."""

from __future__ import annotations

__all__ = [
    "FabricError",
    "ProtocolError",
    "RemoteError",
    "FabricUnavailable",
    "BatchIntegrityError",
]


class FabricError(Exception):
    """Base class of every error the client raises on purpose."""


class ProtocolError(FabricError):
    """A message that does not follow the wire protocol (malformed, oversized, wrong version).

    ``code`` is one of the ``protocol.ErrorCode`` values, so a peer can be told why.
    """

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


class RemoteError(FabricError):
    """The fabric refused a request; carries the remote side's code and reason."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"fabric refused the request ({code}): {reason}")


class FabricUnavailable(FabricError):
    """The fabric could not be reached, or made no progress, before the client's deadline."""


class BatchIntegrityError(FabricError):
    """A received batch whose content does not match the checksum it was sent with."""
