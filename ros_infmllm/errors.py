"""Errors raised at the boundaries of the streaming core (files, inputs, capacity)."""


class CheckpointError(ValueError):
    """A model folder is missing, incomplete or of a layout we do not implement."""


class CacheFullError(RuntimeError):
    """The bounded cache cannot take the next chunk and the policy may not evict (policy 'full')."""
