"""The message store: every message, its state and the answer it was given."""

from .groupcommit import GroupCommitter
from .schema import RECEIVED, REJECTED
from .store import CONFLICT, DUPLICATE, STORED, Incoming, Outcome, Store, StoreError

__all__ = ["GroupCommitter", "Incoming", "Outcome", "Store", "StoreError",
           "RECEIVED", "REJECTED", "STORED", "DUPLICATE", "CONFLICT"]
