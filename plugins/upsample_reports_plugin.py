"""Upsample reports: an Airflow 3 UI plugin for the `cosmos_prompt_upsample` DAG.

Mounts the FastAPI app of the `upsample_reports` package at `/upsample-reports` and adds two external views: a nav
entry (Browse -> Upsample reports) and an "Upsample report" tab on DAG runs. Airflow shows DAG-run tabs on every
DAG's runs, so the tab passes `{DAG_ID}` and the page says when a run is not an upsampling run.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin
from upsample_reports.app import create_app

URL_PREFIX = "/upsample-reports"
# Deployments served under a path (e.g. Astro) set `[api] base_url`; the iframe sources must carry that path.
API_BASE_PATH = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def build_external_views(base_path: str = API_BASE_PATH) -> list[dict[str, Any]]:
    prefix = f"{base_path}{URL_PREFIX}"
    return [
        {
            "name": "Upsample reports",
            "href": f"{prefix}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "upsample-reports",
        },
        {
            "name": "Upsample report",
            # The UI fills in {RUN_ID} and {DAG_ID} (URL-encoded) for views shown on a DAG run.
            "href": f"{prefix}/runs/{{RUN_ID}}?dag_id={{DAG_ID}}",
            "destination": "dag_run",
            "url_route": "upsample-report",
        },
    ]


class UpsampleReportsPlugin(AirflowPlugin):
    name = "upsample_reports"
    fastapi_apps = [{"name": "Upsample reports", "app": create_app(), "url_prefix": URL_PREFIX}]
    external_views = build_external_views()
