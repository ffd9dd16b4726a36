"""The DAG's work without Airflow: the same stage functions called one after another in one Python process.

Run by overhead.py in a fresh interpreter, so it pays the same imports and tokenizer loads the DAG run pays:

    python -m bench.raw_stages --input-dir DIR --output-dir DIR --result FILE

Writes one JSON object to FILE (llama.cpp writes to the same streams, so not stdout): seconds per stage, and
`raw` = validate + upsample (the worker process) + merge.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

RUN_ID = "bench_raw"


def run_stages(input_dir: str, output_dir: str) -> dict[str, float]:
    """discover -> validate (each chunk) -> batch -> upsample (each job, runner local) -> merge -> report."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    from include.cosmos_upsample import stages  # timed: the DAG's tasks import it too
    from include.cosmos_upsample.layout import read_json

    def timed(name, call, *args):
        begun = time.perf_counter()
        result = call(*args)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - begun
        return result

    seconds["import"] = time.perf_counter() - started
    params = {"input_dir": input_dir, "output_dir": output_dir, "backend": "llama_cpp", "runner": "local"}
    run_dir, chunks = timed("discover", stages.discover, params, RUN_ID, lambda _key: None, {})
    jobs = []
    for index, chunk in enumerate(chunks):  # each chunk on its own, as the DAG's mapped task group runs it
        jobs.append(timed("batch", stages.batch, run_dir, chunk, timed("validate", stages.validate_chunk, run_dir,
                                                                          chunk)))
        timed("upsample", stages.upsample, run_dir, jobs[-1], index, {})
    merged = timed("merge", stages.merge, str(run_dir), RUN_ID)
    timed("report", stages.report, str(run_dir), RUN_ID, "bench", "1970-01-01T00:00:00+00:00")
    seconds["raw"] = seconds["validate"] + seconds["upsample"] + seconds["merge"]
    seconds["all"] = time.perf_counter() - started
    seconds["jobs"] = len(jobs)
    seconds["upsampled"] = sum(item["status"] == "upsampled" for item in read_json(Path(merged)))
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    args.result.write_text(json.dumps(run_stages(args.input_dir, args.output_dir)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
