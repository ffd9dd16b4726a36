"""requirements.txt states what was tested: provider floors at the versions the suite runs, and the Docker SDK
pinned to the release line whose private SSH-transport names the docker runner uses."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import ROOT

# The versions this suite was run on (ENVIRONMENT.md); a floor below them would admit untested releases, e.g. SSH
# providers 4.x that auto-add unknown host keys.
TESTED_FLOORS = {"apache-airflow-providers-ssh": "7.0.1", "apache-airflow-providers-docker": "4.6.1",
                 "apache-airflow-providers-standard": "1.21.0", "apache-airflow-providers-amazon": "9.39.0"}


def requirements() -> dict[str, Requirement]:
    found = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            found[requirement.name] = requirement
    return found


@pytest.mark.parametrize("name", sorted(TESTED_FLOORS))
def test_provider_floors_are_the_tested_versions(name):
    requirement = requirements()[name]
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    assert floors and floors[0] >= Version(TESTED_FLOORS[name]), f"{name}: {requirement.specifier or 'no floor'}"
    assert requirement.specifier.contains(version(name)), f"{name} {version(name)} is installed"


def test_the_docker_sdk_is_pinned_to_the_tested_line_and_its_private_names_exist():
    requirement = requirements()["docker"]
    assert any(spec.operator == "<" for spec in requirement.specifier), "no upper bound on docker"
    assert requirement.specifier.contains(version("docker"))
    from docker.transport import basehttpadapter, sshconn

    from docker import APIClient

    assert sshconn.SSHHTTPAdapter and sshconn.RecentlyUsedContainer and basehttpadapter.BaseHTTPAdapter
    assert callable(APIClient._unmount)
