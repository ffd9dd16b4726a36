"""Airflow UI plugin showing `cosmos_prompt_upsample` run reports; registered by `plugins/upsample_reports_plugin.py`.

This package is imported by the plugin module (the plugins folder is on `sys.path`); `plugins/.airflowignore`
keeps Airflow's plugin loader from also importing its modules one by one as top-level plugin files.
"""

from __future__ import annotations
