"""Destinations: where a channel's messages go, one attempt per `deliver`, each reported as a `Result`."""

from .base import Destination, Result
from .file import FileDestination
from .mllp import MLLPDestination

__all__ = ["Destination", "FileDestination", "MLLPDestination", "Result"]
