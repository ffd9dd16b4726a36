"""Object storage vs a local folder: discover + validate of the same specs, side by side in one run, and the video
cache's hit ratio when the S3 specs are validated again.

    .venv/bin/python bench/storage.py            # 200 specs over 8 clips (about 2 minutes on 2 cores)
    .venv/bin/python bench/storage.py --specs 50

S3 is a real moto server on loopback (`python -m moto.server`, the stand-in the Airflow Amazon provider's own tests
use), reached through Airflow's ObjectStoragePath with a connection from the environment. The last line of stdout
is one JSON object of figures (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONN_ID = "bench_s3"
BUCKET = "cosmos-bench"


def start_moto(log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return process, endpoint
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not start; see {log_path}") from None
            time.sleep(0.2)


def upload(folder: Path, root) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            (root / str(path.relative_to(folder))).write_bytes(path.read_bytes())


def discover_and_validate(params: dict, run_id: str) -> tuple[float, float, Path]:
    """Seconds of discover and of validate (every chunk, one after another, as one worker runs them)."""
    from include.cosmos_upsample import stages

    started = time.perf_counter()
    run_dir, chunks = stages.discover(params, run_id, lambda _key: None, {})
    discovered = time.perf_counter()
    for chunk in chunks:
        stages.validate_chunk(run_dir, chunk)
    return discovered - started, time.perf_counter() - discovered, run_dir


def cache_stats(run_dir: Path) -> dict[str, int]:
    totals = {"hits": 0, "downloads": 0}
    for path in (run_dir / "video_cache").glob("*.json"):
        stats = json.loads(path.read_text())
        totals = {key: totals[key] + stats[key] for key in totals}
    return totals


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=200)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "storage")
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)

    from bench.clips import clip
    from bench.specs import write_specs

    folder = args.workdir / "specs"
    write_specs(folder, args.specs, [clip(640, 360, 4.0, variant) for variant in range(args.clips)])
    process, endpoint = start_moto(args.workdir / "moto.log")
    try:
        os.environ["AIRFLOW_CONN_" + CONN_ID.upper()] = json.dumps({
            "conn_type": "aws", "login": "testing", "password": "testing",
            "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}})
        from include.cosmos_upsample.storage import path_from

        root = path_from(f"s3://{BUCKET}/in", CONN_ID)
        root.fs.mkdir(BUCKET)
        upload(folder, root)
        # The Pixtral planner (no model load) and real hint frames; everything else as the DAG's defaults.
        common = {"backend": "vllm", "storage_conn_id": CONN_ID}
        local = {**common, "input_dir": str(folder), "output_dir": str(args.workdir / "out-local")}
        s3 = {**common, "input_dir": f"s3://{BUCKET}/in", "output_dir": f"s3://{BUCKET}/out",
              "work_dir": str(args.workdir / "work-s3")}
        figures: dict = {"specs": args.specs, "clips": args.clips}
        for name, params in (("local", local), ("s3", s3)):
            discover_s, validate_s, run_dir = discover_and_validate(params, f"bench-{name}-1")
            figures[name] = {"discover_s": round(discover_s, 2), "validate_s": round(validate_s, 2),
                             "s_per_spec": round((discover_s + validate_s) / args.specs, 4)}
            print(f"{name}: discover {discover_s:.2f} s, validate {validate_s:.2f} s", flush=True)
        figures["s3_vs_local"] = round(figures["s3"]["s_per_spec"] / figures["local"]["s_per_spec"], 2)
        figures["first_run_cache"] = cache_stats(run_dir)
        # A re-run validates every spec again (no outputs yet): each video must come from work_dir's cache.
        discover_s, validate_s, rerun_dir = discover_and_validate(s3, "bench-s3-2")
        stats = cache_stats(rerun_dir)
        figures["rerun"] = {"discover_s": round(discover_s, 2), "validate_s": round(validate_s, 2), **stats,
                            "hit_ratio": round(stats["hits"] / max(stats["hits"] + stats["downloads"], 1), 3)}
    finally:
        process.terminate()
        process.wait(timeout=10)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
