"""Validation seconds per spec, old code vs new on the same specs, each in a fresh process.

`python -m bench.validate_speed --specs 200 --old-root DIR`: DIR holds an older checkout's `include/` (e.g.
`git archive <commit> include | tar -x -C DIR`). Each side validates the same dry-run specs (backend vllm) in chunks
of 50, as the DAG's mapped validate tasks do in one `airflow dags test` process; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import CACHE_DIR
from bench.scale import shared_clips
from bench.specs import write_specs

CHUNK = 50


def measure(input_dir: Path, work: Path, profile: str | None) -> dict:
    """Runs inside the side's process: validate every spec of input_dir, chunk by chunk."""
    from include.cosmos_upsample.layout import OutputLayout
    from include.cosmos_upsample.settings import resolve_settings
    from include.cosmos_upsample.storage import list_specs

    settings = resolve_settings({"input_dir": str(input_dir), "output_dir": str(work / "out"), "dry_run": True,
                                 "backend": "vllm", "work_dir": str(work / "work")})
    from include.cosmos_upsample.validate import validate_entries

    entries = [{"source_path": str(path), "key": path.stem} for path in list_specs(input_dir, settings.spec_pattern)]
    layout = OutputLayout.at(work / "work")
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started, items = time.monotonic(), []
    for index in range(0, len(entries), CHUNK):
        items.extend(validate_entries(entries[index:index + CHUNK], settings, layout))
    seconds = time.monotonic() - started
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    return {"specs": len(entries), "seconds": seconds, "seconds_per_spec": seconds / len(entries),
            "results": [[item.status, item.tokens.prompt, item.hint and [item.hint.width, item.hint.height]]
                        for item in items]}


def side(root: Path, input_dir: Path, work: Path, profile: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{Path.cwd()}"}
    command = [sys.executable, "-m", "bench.validate_speed", "--measure", str(input_dir), "--work", str(work)]
    if profile:
        command += ["--profile", profile]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--specs", type=int, default=200)
    parser.add_argument("--old-root", type=Path)
    parser.add_argument("--measure", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--profile")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.work, args.profile)))
        return
    base = CACHE_DIR / "validate-speed"
    input_dir = base / f"specs-{args.specs}"
    if not input_dir.is_dir():
        write_specs(input_dir, args.specs, shared_clips())
    sides = {"new": Path.cwd()} | ({"old": args.old_root.resolve()} if args.old_root else {})
    figures = {}
    for name, root in sides.items():
        figures[name] = side(root, input_dir, base / f"work-{name}", args.profile and f"{args.profile}.{name}")
    summary = {name: round(figure["seconds_per_spec"], 4) for name, figure in figures.items()}
    if "old" in figures:
        summary["same_results"] = figures["old"]["results"] == figures["new"]["results"]
        summary["speedup"] = round(figures["old"]["seconds"] / figures["new"]["seconds"], 2)
    summary["specs"] = args.specs
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
