"""fabric_client: the trainer side of the fabricd data-loading fabric.

Light by design (pyzmq, pyarrow, lz4, numpy; torch optional) and independent of the daemon
package. The public surface is :class:`Loader` (iterate over a rank's batches, resume from
``state_dict()``), :class:`FabricBatch`, the error types and :data:`PROTOCOL_VERSION`.
"""

from __future__ import annotations

from .batch import checksum, decode_batch, encode_batch
from .errors import BatchIntegrityError, FabricError, FabricUnavailable, ProtocolError, RemoteError
from .loader import FabricBatch, Loader
from .protocol import PROTOCOL_VERSION

__version__ = "0.1.0"

__all__ = [
    "Loader",
    "FabricBatch",
    "FabricError",
    "ProtocolError",
    "RemoteError",
    "FabricUnavailable",
    "BatchIntegrityError",
    "PROTOCOL_VERSION",
    "encode_batch",
    "decode_batch",
    "checksum",
    "__version__",
]
