"""The message store: every message, its state and the answer it was given."""

from .groupcommit import GroupCommitter
from .schema import DEAD, ERROR, FILTERED, QUEUED, RECEIVED, REJECTED, SENT
from .store import (CONFLICT, DUPLICATE, STORED, Attempt, Incoming, NewDelivery, Outcome,
                    Processed, QueuedDelivery, Store, StoreError, utcnow)

__all__ = ["GroupCommitter", "Incoming", "Outcome", "Store", "StoreError", "Processed",
           "NewDelivery", "QueuedDelivery", "Attempt", "utcnow",
           "RECEIVED", "REJECTED", "FILTERED", "QUEUED", "SENT", "ERROR", "DEAD",
           "STORED", "DUPLICATE", "CONFLICT"]
