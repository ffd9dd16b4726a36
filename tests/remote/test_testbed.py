"""The test bed's own promise (scripts/testbed.sh): the services it leaves running do not depend on the folder `up`
was called from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.remote


def test_the_podman_service_runs_from_the_root_folder_not_the_callers(testbed):
    # conmon, which the service starts for every container, needs the service's working directory. A service
    # started in a fresh clone that was deleted afterwards failed every container start ("write child: broken
    # pipe"; its log: "[conmon:e] Failed to get working directory").
    pid = int((Path(testbed["COSMOS_TESTBED_DIR"]) / "podman" / "service.pid").read_text())
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
