"""The store's tables. Only the store package knows them; everyone else calls its API."""

from sqlalchemy import (BigInteger, Column, DateTime, Index, Integer, LargeBinary, MetaData,
                        String, Table, Text)

metadata = MetaData()

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL wants 64 bits.
_Id = BigInteger().with_variant(Integer(), "sqlite")

#: States a message row can be in. Later stages add their own.
RECEIVED, REJECTED = "received", "rejected"

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
    Index("ix_messages_control_id", "control_id", "sending_application", "sending_facility"),
    Index("ix_messages_received_at", "received_at"),
    Index("ix_messages_state", "state"),
)
