"""Start and describe the loopback "remote GPU host" test bed (scripts/testbed.sh).

Import this from tests/conftest or from a test module:

    from testbed import ensure_testbed, testbed_available

    ok, why = testbed_available()
    if not ok:
        pytest.skip(why)
    env = ensure_testbed()   # runs `scripts/testbed.sh up` once per process
    env["COSMOS_TESTBED_DOCKER_URL"]   # "ssh://root@127.0.0.1:2222"

The returned dict holds the keys of `<state>/env`: COSMOS_TESTBED_DIR, COSMOS_TESTBED_SSH_HOST,
COSMOS_TESTBED_SSH_PORT, COSMOS_TESTBED_SSH_USER, COSMOS_TESTBED_SSH_KEY, COSMOS_TESTBED_HOST_KEY,
COSMOS_TESTBED_KNOWN_HOSTS, COSMOS_TESTBED_DOCKER_HOST, COSMOS_TESTBED_DOCKER_URL,
COSMOS_TESTBED_BASE_IMAGE, CONTAINERS_CONF, CONTAINERS_STORAGE_CONF (all strings).

`up` is idempotent and takes a lock, so parallel test processes may each call ensure_testbed().
No pytest import here: the module is also usable from plain scripts.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "testbed.sh"

# A cold `up` installs apt packages and debootstraps the base image: minutes, not seconds.
UP_TIMEOUT_S = int(os.environ.get("COSMOS_TESTBED_UP_TIMEOUT", "1800"))

_lock = threading.Lock()
_env: dict[str, str] | None = None
_error: RuntimeError | None = None


def testbed_available() -> tuple[bool, str]:
    """Cheap check (starts nothing) whether ensure_testbed() can work on this machine.

    Set COSMOS_TESTBED=0 to turn the test bed off (tests that need it should then skip).
    """
    if os.environ.get("COSMOS_TESTBED", "1").lower() in ("0", "false", "no", "off"):
        return False, "test bed disabled by COSMOS_TESTBED=0"
    if not sys.platform.startswith("linux"):
        return False, f"test bed needs Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return False, "test bed needs root (it runs sshd and podman as root and may apt-get install)"
    if not SCRIPT.is_file():
        return False, f"{SCRIPT} is missing"
    if shutil.which("bash") is None:
        return False, "bash not found"
    # Either everything is installed already, or `up` can install it with apt-get.
    if shutil.which("apt-get") is None and not all(
        shutil.which(tool) for tool in ("/usr/sbin/sshd", "podman", "runc", "docker", "debootstrap")
    ):
        return False, "sshd/podman/runc/docker missing and no apt-get to install them"
    if _error is not None:
        return False, str(_error)
    return True, ""


def parse_env(text: str) -> dict[str, str]:
    """Parse the `export KEY='value'` lines that `scripts/testbed.sh env` prints."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "export":
            words = words[1:]
        for word in words:
            key, sep, value = word.partition("=")
            if sep:
                env[key] = value
    return env


def _run(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), command],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ensure_testbed() -> dict[str, str]:
    """Bring the test bed up (once per process) and return its env dict.

    Raises RuntimeError with the script's output when it cannot come up; the failure is
    remembered, so later calls in the same process fail fast instead of retrying for minutes.
    """
    global _env, _error
    with _lock:
        if _env is not None:
            return dict(_env)
        if _error is not None:
            raise _error
        try:
            up = _run("up", UP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            _error = RuntimeError(f"scripts/testbed.sh up timed out after {exc.timeout} s")
            raise _error from None
        if up.returncode != 0:
            _error = RuntimeError(
                f"scripts/testbed.sh up failed (exit {up.returncode}):\n{(up.stdout + up.stderr)[-4000:]}"
            )
            raise _error
        printed = _run("env", 30)
        if printed.returncode != 0:
            _error = RuntimeError(f"scripts/testbed.sh env failed:\n{printed.stderr[-2000:]}")
            raise _error
        _env = parse_env(printed.stdout)
        return dict(_env)


if __name__ == "__main__":  # python tests/testbed.py: bring it up and print the env
    for key, value in ensure_testbed().items():
        print(f"{key}={value}")
