#!/usr/bin/env bash
# The GPU check: one command on one H100/H200 from a bare checkout, no network, under 8 minutes.
#
#   bash benchmarks/gpu_check.sh              # writes benchmarks/results/<date>-<gpu>.json
#   bash benchmarks/gpu_check.sh --dry-run    # CPU plumbing: tiny shapes, Triton interpreter, /tmp JSON
#
# Steps, each time-boxed with `timeout` (seconds): install the project without dependencies (60), bf16
# kernel parity + fused ops + CUDA-graph equality (benchmarks/gpu_parity.py, 150), kernel
# micro-benchmarks (bench_kernels.py, 90), a reduced bench_gpu.py (shared_prefix at 1/8 scale: batchllm vs
# --no-prefix-sharing vs transformers generate(), 180). Prints PASS/FAIL per step; exits 1 on any FAIL.
set -u
cd "$(dirname "$0")/.."
DRY=""; [ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
export TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -n "$DRY" ] && export TRITON_INTERPRET=1
WORK=$(mktemp -d)
declare -A STATUS SECONDS_OF

step() {  # step NAME LIMIT COMMAND...: run it under timeout, log to $WORK/NAME.log, record its status
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1; rc=$?
    SECONDS_OF[$name]=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then STATUS[$name]=PASS; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        STATUS[$name]="FAIL (timed out after ${limit}s)"; else STATUS[$name]="FAIL (exit $rc)"; fi
    printf '%-8s %-12s %4ss\n' "${STATUS[$name]%% *}" "$name" "${SECONDS_OF[$name]}"
    [ $rc -eq 0 ] || tail -n 15 "$WORK/$name.log" | sed 's/^/    /'
}

if [ -z "$DRY" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    step install 60 python -m pip install --no-deps --no-build-isolation --no-index -q -e .
fi
step parity 150 python benchmarks/gpu_parity.py $DRY --out "$WORK/parity.json"
[ -z "$DRY" ] && step kernels 90 python benchmarks/bench_kernels.py
if [ -n "$DRY" ]; then
    step bench_gpu 300 python benchmarks/bench_gpu.py --dry-run --workloads shared_prefix \
        --systems batchllm,batchllm_no_sharing,hf_generate --out "$WORK/bench_gpu.json"
else
    step bench_gpu 180 python benchmarks/bench_gpu.py --workloads shared_prefix --scale 0.125 \
        --systems batchllm,batchllm_no_sharing,hf_generate --hf-rows 32 --out "$WORK/bench_gpu.json"
fi

STATUS_JSON=$(for k in "${!STATUS[@]}"; do printf '%s\t%s\t%s\n' "$k" "${STATUS[$k]}" "${SECONDS_OF[$k]}"; done)
STATUS_JSON="$STATUS_JSON" WORK="$WORK" DRY="$DRY" python - <<'PY'
import datetime, json, os, re, subprocess
from pathlib import Path

work, dry = Path(os.environ["WORK"]), bool(os.environ["DRY"])
steps = {}
for line in os.environ["STATUS_JSON"].splitlines():
    name, status, seconds = line.split("\t")
    log = (work / f"{name}.log").read_text(errors="replace").splitlines()
    steps[name] = {"status": status, "seconds": int(seconds), "log_tail": log[-40:]}
report = {"date": datetime.date.today().isoformat(), "dry_run": dry, "steps": steps}
for part in ("parity", "bench_gpu"):
    if (work / f"{part}.json").is_file():
        report[part] = json.loads((work / f"{part}.json").read_text())
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=20).stdout.splitlines()[0]
except Exception:
    gpu = "cpu"
report["gpu"] = "cpu (dry run)" if dry else gpu
slug = re.sub(r"[^a-z0-9]+", "-", report["gpu"].lower()).strip("-")
out = Path(f"/tmp/gpu_check-dry-run.json") if dry else Path(f"benchmarks/results/{report['date']}-{slug}.json")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"\nwrote {out}")
PY
FAILED=0
echo "== summary =="
for k in "${!STATUS[@]}"; do echo "  $k: ${STATUS[$k]}"; [ "${STATUS[$k]}" = PASS ] || FAILED=1; done
rm -rf "$WORK"
[ $FAILED -eq 0 ] && echo "GPU CHECK: PASS" || echo "GPU CHECK: FAIL"
exit $FAILED
