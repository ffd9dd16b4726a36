"""Cosmos prompt upsampling: the library the `cosmos_prompt_upsample` DAG calls.

Nothing here imports Airflow at module level, so the DAG file parses fast and the pure modules are testable alone.
"""
