"""The control plane: lease election, membership, the checkpoint log and its replication, role
placement and pool autoscaling. The lease names are re-exported here."""

from fabricd.cluster.lease import (
    CANDIDATE,
    FOLLOWER,
    LEADER,
    PRE_CANDIDATE,
    Action,
    BecameLeader,
    LeaderChanged,
    LeaseAck,
    LeaseBackend,
    LeaseConfig,
    LeaseElection,
    LeaseMessage,
    LeaseRelease,
    LeaseRenew,
    Send,
    SteppedDown,
    VoteReply,
    VoteRequest,
)
from fabricd.cluster.term_store import FileTermStore, MemoryTermStore, TermStore, TermStoreError

__all__ = [
    "CANDIDATE",
    "FOLLOWER",
    "LEADER",
    "PRE_CANDIDATE",
    "Action",
    "BecameLeader",
    "LeaderChanged",
    "LeaseAck",
    "LeaseBackend",
    "LeaseConfig",
    "LeaseElection",
    "LeaseMessage",
    "LeaseRelease",
    "LeaseRenew",
    "Send",
    "SteppedDown",
    "VoteReply",
    "VoteRequest",
    "FileTermStore",
    "MemoryTermStore",
    "TermStore",
    "TermStoreError",
]
