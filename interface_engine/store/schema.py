"""The store's tables. Only the store package knows them; everyone else calls its API."""

from sqlalchemy import (BigInteger, Column, DateTime, Float, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, String, Table, Text, text)

metadata = MetaData()

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL wants 64 bits.
_Id = BigInteger().with_variant(Integer(), "sqlite")

#: Message states. `received`: stored, not yet through its channel (or it has none);
#: then `filtered`, or `queued` until every delivery is `sent` (or `error`/`dead`).
RECEIVED, REJECTED, FILTERED, QUEUED, SENT, ERROR, DEAD = (
    "received", "rejected", "filtered", "queued", "sent", "error", "dead")
#: Delivery states: waiting in its destination's queue, done, failing, given up, or not for it.
PENDING_STATES = (QUEUED, ERROR)

messages = Table(
    "messages", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("received_at", DateTime(), nullable=False, comment="UTC"),
    Column("listener", String(64), nullable=False),
    Column("peer", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("error", Text(), comment="why it was rejected; never message content"),
    Column("sending_application", String(227), nullable=False, default=""),
    Column("sending_facility", String(227), nullable=False, default=""),
    Column("receiving_application", String(227), nullable=False, default=""),
    Column("receiving_facility", String(227), nullable=False, default=""),
    Column("message_type", String(16), nullable=False, default=""),
    Column("trigger_event", String(16), nullable=False, default=""),
    Column("control_id", String(199), nullable=False, default=""),
    Column("version", String(16), nullable=False, default=""),
    Column("size", Integer(), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("raw", LargeBinary(), nullable=False, comment="the bytes exactly as received"),
    Column("ack", LargeBinary(), comment="the answer sent to the sender"),
    Column("duplicates", Integer(), nullable=False, default=0,
           comment="identical copies received later and answered from this row"),
    Column("channel", String(64), comment="the channel that took it; NULL: stored only"),
    Column("filter_reason", Text(), comment="the rule that filtered it out"),
    Index("ix_messages_control_id", "control_id", "sending_application", "sending_facility"),
    Index("ix_messages_received_at", "received_at"),
    Index("ix_messages_state", "state"),
    Index("ix_messages_channel_state", "channel", "state", "id"),
)

deliveries = Table(
    "deliveries", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("message_id", _Id, ForeignKey("messages.id"), nullable=False),
    Column("channel", String(64), nullable=False),
    Column("destination", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer(), nullable=False, default=0),
    Column("next_attempt_at", DateTime(), comment="UTC; NULL: at once"),
    Column("target", Text(), comment="where it goes, e.g. the file path"),
    Column("output", LargeBinary(), comment="the rendered payload; NULL if rendering failed"),
    Column("last_error", Text()),
    Column("response", LargeBinary(), comment="the last answer from the far side"),
    Column("created_at", DateTime(), nullable=False),
    Column("updated_at", DateTime(), nullable=False),
    Index("ix_deliveries_message", "message_id"),
    # Each destination's FIFO queue: its waiting deliveries in id order.
    Index("ix_deliveries_queue", "channel", "destination", "id",
          sqlite_where=text("state IN ('queued', 'error')"),
          postgresql_where=text("state IN ('queued', 'error')")),
)

attempts = Table(
    "attempts", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("delivery_id", _Id, ForeignKey("deliveries.id"), nullable=False),
    Column("started_at", DateTime(), nullable=False),
    Column("duration_ms", Float(), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("error", Text()),
    Column("response", LargeBinary()),
    Index("ix_attempts_delivery", "delivery_id"),
)

# -- search: the patient index and the indexes behind `messages search` and `status` ---------

#: Patients a message is about, as keyed hashes of PID-3 (see keys.Keys.patient_hash):
#: the index finds a patient's messages without holding the identifier in clear.
message_patients = Table(
    "message_patients", metadata,
    Column("message_id", _Id, ForeignKey("messages.id"), primary_key=True),
    Column("patient_hash", String(64), primary_key=True),
    Index("ix_message_patients_hash", "patient_hash", "message_id"),
)
Index("ix_messages_type", messages.c.message_type, messages.c.trigger_event)
Index("ix_messages_sender", messages.c.sending_application, messages.c.sending_facility)
# Search by destination (ordered by message) and the counts of `status` (channel covered).
Index("ix_deliveries_destination", deliveries.c.destination, deliveries.c.state,
      deliveries.c.message_id, deliveries.c.channel)
