"""The store's tables. Only the store package knows them; everyone else calls its API."""

from sqlalchemy import (BigInteger, Column, DateTime, Float, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, String, Table, Text, text)

metadata = MetaData()

#: Contents (raw, output, response) are sealed (store/cipher.py); the column beside each
#: names the data key.
_SEALED = "data key that sealed it; NULL: stored in clear"

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
    Column("raw_key", String(16), comment=_SEALED),
    Column("ack", LargeBinary(), comment="the answer sent to the sender"),
    Column("duplicates", Integer(), nullable=False, default=0,
           comment="identical copies received later and answered from this row"),
    Column("channel", String(64), comment="the channel that took it; NULL: stored only"),
    Column("filter_reason", Text(), comment="the rule that filtered it out"),
    Column("correlation_id", String(32), comment="follows the message through the audit trail"),
    Column("content_removed_at", DateTime(), comment="UTC; retention removed raw, outputs, responses"),
    Column("node", String(64), comment="the engine that stored it; NULL: stored before engines had names"),
    # No foreign key: retention may delete the original and keep the correction.
    Column("edited_from", _Id, comment="the message this one corrects, edited by hand and resent"),
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
    Column("output_key", String(16), comment=_SEALED),
    Column("last_error", Text()),
    Column("response", LargeBinary(), comment="the last answer from the far side"),
    Column("response_key", String(16), comment=_SEALED),
    Column("created_at", DateTime(), nullable=False),
    Column("updated_at", DateTime(), nullable=False),
    Column("replay_of", _Id, ForeignKey("deliveries.id"), comment="the delivery this one repeats"),
    Column("replay_id", _Id, ForeignKey("replays.id"), comment="the replay that queued it"),
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
    Column("response_key", String(16), comment=_SEALED),
    Index("ix_attempts_delivery", "delivery_id"),
)

# -- audit trail (interface_engine/audit.py writes and verifies these) ------------------

#: Append-only events, one HMAC chain per engine node: each row's mac covers the
#: previous row's mac and this row's fields, so an edit cannot be re-sealed without the key.
audit_events = Table(
    "audit_events", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("chain", String(64), nullable=False, comment="the engine node that wrote it"),
    Column("seq", BigInteger(), nullable=False, comment="1, 2, 3... within the chain"),
    Column("at", DateTime(), nullable=False, comment="UTC"),
    Column("actor", String(128), nullable=False, comment="user or service"),
    Column("action", String(64), nullable=False),
    Column("object_type", String(32), nullable=False),
    Column("object_id", String(128), nullable=False),
    Column("source", String(255), nullable=False, comment="from where: peer address, cli@host"),
    Column("outcome", String(16), nullable=False),
    Column("correlation_id", String(32)),
    Column("detail", Text(), comment="small JSON; never message content"),
    Column("mac", String(64), nullable=False),
    Index("ux_audit_events_chain_seq", "chain", "seq", unique=True),
)

#: Each chain's last seq and mac; its row is the lock that serialises a chain's writers.
audit_heads = Table(
    "audit_heads", metadata,
    Column("chain", String(64), primary_key=True),
    Column("seq", BigInteger(), nullable=False),
    Column("mac", String(64), nullable=False),
)

# -- replay ----------------------------------------------------------------------

#: One row per replay: who asked for which messages, how, and how many were queued.
#: Replayed deliveries point here and to the delivery they repeat; nothing is rewritten.
replays = Table(
    "replays", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("at", DateTime(), nullable=False, comment="UTC"),
    Column("actor", String(64), nullable=False, comment="the OS user who ran it"),
    Column("source", String(255), nullable=False, comment="the host it was run on"),
    Column("selection", Text(), nullable=False, comment="which messages, as given"),
    Column("mapping", String(16), nullable=False, comment="current or original"),
    Column("destinations", Text(), comment="names asked for; NULL: every destination of the channel"),
    Column("messages", Integer(), nullable=False, default=0),
    Column("deliveries", Integer(), nullable=False, default=0),
)

# What the foreign key check reads when a delivery is deleted; only replayed rows are in it.
_REPLAYED = text("replay_of IS NOT NULL")
Index("ix_deliveries_replay_of", deliveries.c.replay_of, sqlite_where=_REPLAYED, postgresql_where=_REPLAYED)
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
# -- Several engines on one store: who is alive, and who delivers for each queue ----------------

nodes = Table(
    "nodes", metadata,
    Column("name", String(64), primary_key=True, comment="[engine] node"),
    Column("pid", Integer(), nullable=False),
    Column("host", String(255), nullable=False),
    Column("started_at", DateTime(), nullable=False, comment="UTC"),
    Column("seen_at", DateTime(), nullable=False, comment="UTC, the database's clock: the heartbeat"),
)

queue_leases = Table(
    "queue_leases", metadata,
    Column("channel", String(64), primary_key=True),
    Column("destination", String(64), primary_key=True),
    Column("owner", String(64), comment="the node that delivers for this queue; NULL: free"),
    Column("token", String(32), comment="the owner's process run: a restarted node waits like the others"),
    Column("expires_at", DateTime(), comment="UTC, the database's clock"),
)
# -- admin console: users and API tokens, as hashes only (admin/auth.py) ----------------------

admin_users = Table(
    "admin_users", metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False, comment="viewer, analyst, operator or admin"),
    Column("password_hash", String(255), nullable=False, comment="scrypt, salted"),
    Column("created_at", DateTime(), nullable=False, comment="UTC"),
)

api_tokens = Table(
    "api_tokens", metadata,
    Column("id", String(16), primary_key=True, comment="the public part of the token"),
    Column("name", String(64), nullable=False, comment="what it is for, e.g. prometheus"),
    Column("role", String(16), nullable=False),
    Column("secret_hash", String(64), nullable=False, comment="SHA-256 of the secret part"),
    Column("created_at", DateTime(), nullable=False, comment="UTC"),
    Column("revoked_at", DateTime(), comment="UTC; NULL: in use"),
)

#: What an operator paused: a channel's processing (destination '') or one destination's deliveries.
pauses = Table(
    "pauses", metadata,
    Column("channel", String(64), primary_key=True),
    Column("destination", String(64), primary_key=True,
           comment="'': the channel's processing; else that destination's deliveries"),
    Column("paused_at", DateTime(), nullable=False, comment="UTC"),
    Column("actor", String(128), nullable=False),
)
