"""Errors that retrying cannot fix: the DAG fails such a task at once instead of waiting out its retries."""

from __future__ import annotations


class NotRetryable(RuntimeError):
    """A configuration problem (a refused host key, say); the message says what to fix."""
