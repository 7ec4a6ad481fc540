#!/usr/bin/env bash
# The accelerator benchmarks in one command (issue #20): paged-attention kernels, engine throughput at
# the Llama-3.2-1B shape, and the agent replay. Sized for 8 minutes on one H100; needs no package
# registry on that machine.
#
#   here:  make device-wheels          # .whl/: the dependencies the device image lacks, Python 3.12
#   there: bash tools/device_bench.sh   # the device tool's run, carry [".whl"]; results under $OUT
#
# The device image has its own python3 with JAX, flax, optax, orbax and friends; our package and
# the few missing dependencies are installed into /tmp/site, never from a registry.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/device-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/device_bench.log"; }

log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$REPO"/.whl/*.whl || { log "installing .whl failed"; exit 1; }
# Our package from source (setuptools from .whl; the compiled AgentSAM walk is optional).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site "$REPO" \
  || { log "installing agentinfer-jax failed"; exit 1; }
cd /tmp  # import the installed package, never the checkout
python3 -c "import jax, agentinfer_jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device_bench.log"

# Each step has its own time limit so that one slow step cannot eat the others' share.
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  log "start $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  log "end $name rc=$? ($(tail -n 1 "$OUT/$name.txt"))"
}
step kernel 90 python3 -m agentinfer_jax.kernels.benchmark_paged_attention --json_out "$OUT/kernel.json"
step engine_1b 240 python3 "$REPO/experiments/engine_throughput.py" --config=llama3_2_1b --dtype=bfloat16 \
  --batch_sizes=1,4,16 --context_lens=2048 --gen_len=64 --drafters=none,sam_adaptive --rounds=11 --nocompile_all \
  --compilation_cache_dir=/tmp/xla-cache --json_out="$OUT/engine_throughput_1b.json"
step agent_e2e 150 python3 "$REPO/experiments/agent_e2e.py" --quick --repeats=1 \
  --json_out="$OUT/agent_e2e.json"
log "done"
