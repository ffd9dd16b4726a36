#!/usr/bin/env bash
# Quick start (a): set up, then run the DAG once on the bundled samples with the embedded defaults
# (SQLite, runner `local`, the small local model) and print where the report is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/airflow-env.sh"
cd "$ROOT"
conf="${1:-{\}}"
log="$AIRFLOW_HOME/last-sample-run.log"
echo "run: airflow dags test cosmos_prompt_upsample -c '$conf' (log: $log)"
if ! airflow dags test cosmos_prompt_upsample -c "$conf" >"$log" 2>&1; then
  tail -n 40 "$log"; echo "run: FAILED, full log in $log"; exit 1
fi
grep -q "DagRun Finished: .* state=success" "$log" || { tail -n 40 "$log"; echo "run: the DAG run did not succeed; see $log"; exit 1; }
output_dir="${COSMOS_UPSAMPLE_OUTPUT_DIR:-$ROOT/outputs}"
report=$(ls -t "$output_dir"/reports/*.json | head -n 1)
python - "$report" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
print("run:", report["run_id"], report["state"], report["counts"])
for item in report["items"]:
    print(f"  {item['spec_id']:<22} {item['status']:<10} {item['reason'] or (item['upsampled_prompt'] or '')[:90]}")
PY
echo "report: $report"
echo "report: ${report%.json}.html"
