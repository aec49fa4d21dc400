"""Channels: filter, transform, route."""
