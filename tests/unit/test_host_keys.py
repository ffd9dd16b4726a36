"""The docker runner refuses any GPU-host connection whose hook would accept a host key it was not given, whatever
the SSH provider's defaults; an unknown connection id names the setting to fix."""

from __future__ import annotations

import json

import pytest

from include.cosmos_upsample.errors import NotRetryable, UnknownConnection
from include.cosmos_upsample.ssh_hosts import HostKeyError, ssh_hook

PINNED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def connection(monkeypatch, **extra) -> str:
    monkeypatch.setenv("AIRFLOW_CONN_GPU_TEST", json.dumps(
        {"conn_type": "ssh", "host": "gpu.invalid", "login": "cosmos", "extra": extra}))
    return "gpu_test"


@pytest.mark.parametrize("extra", [{"no_host_key_check": "true"}, {"allow_host_key_change": "true"},
                                   {"no_host_key_check": True, "allow_host_key_change": True}])
def test_a_connection_that_would_accept_any_host_key_is_refused(monkeypatch, extra):
    with pytest.raises(HostKeyError) as caught:
        ssh_hook(connection(monkeypatch, **extra))
    message = str(caught.value)
    assert "connection gpu_test sets" in message and "host_key extra" in message
    assert all(flag in message for flag in extra)
    assert isinstance(caught.value, NotRetryable)


def test_a_pinned_host_key_is_accepted(monkeypatch):
    hook = ssh_hook(connection(monkeypatch, host_key=PINNED))
    assert hook.host_key is not None and not hook.no_host_key_check and not hook.allow_host_key_change


def test_an_unknown_connection_id_names_the_setting(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_GPU_NOWHERE", raising=False)
    with pytest.raises(UnknownConnection, match="'gpu_nowhere' \\(named in gpu_conn_ids\\) is not defined"):
        ssh_hook("gpu_nowhere")
