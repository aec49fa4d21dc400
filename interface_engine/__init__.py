"""An HL7 v2 interface engine: MLLP in, a durable message store, channels out."""

__version__ = "0.1.0"
