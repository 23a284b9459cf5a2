#!/usr/bin/env bash
# The benchmarks on a GPU, when one is present (the issue "scale out": run once on a GPU and put
# the tables in the README).
#
#   bash benchmarks/gpu_check.sh            # full sizes
#   QUICK=1 bash benchmarks/gpu_check.sh    # smoke sizes (a few minutes)
#
# Needs an NVIDIA GPU and a JAX with CUDA in the Python it runs ($PYTHON, else .venv/bin/python,
# else python3), e.g. `pip install -e ".[dev]" "jax[cuda12]"`. Without a GPU it says so and exits
# 0 having run nothing; with a GPU but a CPU-only JAX it exits 1 saying what to install.
#
# The benchmark scripts write benchmarks/results/*.json; this script keeps the CPU results in
# place and moves the GPU ones to benchmarks/results/gpu/, with the whole log in
# benchmarks/results/gpu/gpu_check.log (the tables to paste into the README are in it).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); nothing run."
  exit 0
fi
backend=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo "none")
if [[ "$backend" != "gpu" ]]; then
  echo "gpu_check: a GPU is present but JAX in $PY runs on '$backend'."
  echo "  install a CUDA JAX there, e.g.: $PY -m pip install -U \"jax[cuda12]\""
  exit 1
fi

out=benchmarks/results/gpu
mkdir -p "$out"
log="$out/gpu_check.log"
keep=$(mktemp -d)
cp benchmarks/results/*.json "$keep"/ 2>/dev/null || true
touch "$keep/.start"
restore() {  # GPU results to $out; the CPU results stay where the README points
  for f in benchmarks/results/*.json; do
    if [[ -e "$f" && "$f" -nt "$keep/.start" ]]; then mv "$f" "$out"/; fi
  done
  cp "$keep"/*.json benchmarks/results/ 2>/dev/null || true
  rm -rf "$keep"
}
trap restore EXIT

export XLA_PYTHON_CLIENT_PREALLOCATE=false  # share the GPU politely; the sizes here are small
quick=()
[[ -n "${QUICK:-}" ]] && quick=(--quick)

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  echo
  echo "## Loop A (bench_instant.py; the 'default' rows are the GPU; the peer needs Node, skipped)"
  "$PY" benchmarks/bench_instant.py --no-install ${quick[@]+"${quick[@]}"}
  echo
  echo "## Loop B (bench_background.py)"
  if [[ -n "${QUICK:-}" ]]; then
    "$PY" benchmarks/bench_background.py --no-install --sizes 1000 5200
  else
    "$PY" benchmarks/bench_background.py --no-install
  fi
  echo
  echo "## Scale (bench_scale.py: tenants on the GPU; Loop B on forced CPU devices is a CPU matter)"
  "$PY" benchmarks/bench_scale.py --skip-devices ${quick[@]+"${quick[@]}"}
  if [[ -f benchmarks/bench_deep.py ]]; then
    echo
    echo "## Loop C (bench_deep.py)"
    "$PY" benchmarks/bench_deep.py ${quick[@]+"${quick[@]}"}
  fi
} 2>&1 | tee "$log"
echo "gpu_check: done; results in $out/"
