"""SSH connections to the GPU hosts (runner `docker`), their host keys verified: never auto-accepted.

A host is an Airflow SSH connection (`gpu_conn_ids`). Its SSHHook's client, whose host key was verified against the
connection's pinned `host_key` (or the worker's known_hosts, read only), is the one connection a job's staging, its
Docker API (containers.py) and GPU discovery (gpu_slots.py) run over. Nothing is written to the worker's ~/.ssh.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from include.cosmos_upsample.errors import NotRetryable, UnknownConnection, is_unknown_connection


class HostKeyError(NotRetryable):
    """The GPU host's SSH key is unknown or changed: refused, never auto-accepted."""


class HostUnreachable(RuntimeError):
    """The GPU host did not answer; the task's retries (with backoff) try again."""


@contextmanager
def gpu_connection(conn_id: str) -> Iterator[None]:
    """Looking up a GPU host's connection: an id Airflow does not know is a setting to fix, not something to retry."""
    try:
        yield
    except Exception as exc:
        if is_unknown_connection(exc):
            raise UnknownConnection(conn_id, "gpu_conn_ids") from None
        raise


def connection_extra(conn_id: str) -> dict[str, Any]:
    from airflow.providers.ssh.hooks.ssh import SSHHook

    with gpu_connection(conn_id):
        return SSHHook.get_connection(conn_id).extra_dejson


def ssh_hook(conn_id: str):
    """The hook of a GPU host's connection, refused when it would accept a host key it has not been given."""
    from airflow.providers.ssh.hooks.ssh import SSHHook

    # cmd_timeout is about silence on a command; staging is SFTP only, and the model job runs through Docker.
    # One connect attempt per task try: the task's own retries (with backoff) cover an unreachable host.
    with gpu_connection(conn_id):
        hook = SSHHook(ssh_conn_id=conn_id, cmd_timeout=None, conn_timeout=20, conn_retry_attempts=1)
    # Verification must not rest on the provider's defaults (older providers auto-added unknown keys): either flag
    # makes SSHHook.get_conn accept a key nobody vouched for (AutoAddPolicy / no BadHostKeyException).
    accepting = [flag for flag in ("no_host_key_check", "allow_host_key_change") if getattr(hook, flag, False)]
    if accepting:
        raise HostKeyError(
            f"connection {conn_id} sets {' and '.join(accepting)}, so any host key would be accepted; the runner "
            "refuses it: remove that extra and put the host's public key ('ssh-ed25519 AAAA...', from ssh-keyscan on "
            "a trusted network) in the connection's host_key extra")
    return hook


def open_verified(hook):
    """Connect, turning paramiko's refusals into messages that say what to fix."""
    import paramiko

    try:
        return hook.get_conn()
    except (paramiko.ssh_exception.NoValidConnectionsError, TimeoutError, ConnectionError) as exc:
        raise HostUnreachable(
            f"GPU host {hook.remote_host}:{hook.port} (connection {hook.ssh_conn_id}) is unreachable ({exc}); "
            "check that the host is up and sshd listens there"
        ) from None
    except paramiko.BadHostKeyException as exc:
        raise HostKeyError(
            f"GPU host {hook.remote_host}:{hook.port} (connection {hook.ssh_conn_id}) presented a different host key "
            f"({exc.key.get_name()}) than the one configured; if the host was rebuilt, update the connection's "
            "host_key extra, otherwise treat it as an attack"
        ) from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise HostKeyError(
                f"GPU host {hook.remote_host}:{hook.port} (connection {hook.ssh_conn_id}) is not known: put its "
                "public host key ('ssh-ed25519 AAAA...', from ssh-keyscan on a trusted network) in the connection's "
                "host_key extra"
            ) from None
        raise
