"""Exceptions shared by the passes, the rewrite driver and the backend.

They live at the bottom of the package (beside ``config``, ``report`` and ``ops``) so that
a pass can raise them without importing anything above it.
"""
from __future__ import annotations


class CannotRewrite(RuntimeError):
    """The graph cannot be rewritten safely; the message says where and why. The backend
    then compiles the graph unchanged and logs the message as the fallback reason."""


class NothingToMerge(Exception):
    """The graph is fine but the configuration merges nothing in it (e.g. r=0): it is
    compiled unchanged, without a warning."""
