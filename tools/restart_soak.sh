#!/usr/bin/env bash
# Soak test of elastic restarts: N times, 2 gloo ranks pre-train the tiny glyph model under
# torchrun --max-restarts 1, rank 1 SIGKILLs itself after the first step checkpoint, and the
# restarted group must finish. One line per run: exit code, seconds, worker failures seen
# (1 = the SIGKILL only). A run still going after 150 s is a hang: every process's Python
# stack is dumped with py-spy (if installed) next to its log, then the run is killed.
#   usage: tools/restart_soak.sh [N=30] [OUT=/tmp/restart-soak]
set -u
N=${1:-30}; OUT=${2:-/tmp/restart-soak}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
mkdir -p "$OUT"
for i in $(seq 1 "$N"); do
  d=$OUT/run$i; rm -rf "$d"; mkdir -p "$d"
  OMP_NUM_THREADS=1 NMTUNE_DIST_TIMEOUT=60 NMTUNE_SIGKILL_AFTER_STEP_CHECKPOINT=1 \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 --max-restarts 1 \
    examples/pretrain.py --tiny --epochs 2 --batch-size 8 --noise 0.1 --checkpoint-every-steps 3 \
    --out "$d/out" > "$d/log" 2>&1 &
  pid=$!
  for t in $(seq 1 150); do sleep 1; kill -0 "$pid" 2>/dev/null || break; done
  if kill -0 "$pid" 2>/dev/null; then
    # torchrun starts each worker in a session of its own: find them through their parent
    kids=$(pgrep -P "$pid")
    if command -v py-spy >/dev/null; then
      for p in $pid $kids; do echo "=== $p"; py-spy dump --pid "$p"; done > "$d/stacks.txt" 2>&1
    fi
    kill -9 "$pid" $kids 2>/dev/null; wait "$pid" 2>/dev/null
    echo "run $i HUNG (stacks: $d/stacks.txt)"
  else
    wait "$pid"; rc=$?
    echo "run $i rc=$rc t=${t}s worker_failures=$(grep -c 'failed (exitcode' "$d/log")"
  fi
done
