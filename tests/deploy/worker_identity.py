"""`[core] hostname_callable` for the Celery workers of the deployment tests: both run on this one machine, so each
gets the name a worker machine would have, and task instances record which worker ran them."""

from __future__ import annotations

import os
import socket

WORKER_NAME_ENV = "COSMOS_DEPLOY_TEST_WORKER_NAME"


def hostname() -> str:
    return os.environ.get(WORKER_NAME_ENV) or socket.getfqdn()
