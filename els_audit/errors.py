"""The audit's input error (kept apart so that every stage module can raise it)."""

from __future__ import annotations


class AuditError(ValueError):
    """The audit cannot run with this input; the message is one line saying what to do."""
