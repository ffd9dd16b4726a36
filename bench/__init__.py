"""Benchmarks of the pipeline near its limits; `python bench/run.py --quick` prints the figures (see RESULTS.md)."""

from __future__ import annotations
