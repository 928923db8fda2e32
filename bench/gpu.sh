#!/usr/bin/env bash
# GPU benchmark of the training step and the trainer's CUDA paths (bench/gpu_bench.py).
#
#   bash bench/gpu.sh [--out FILE.md] [--budget SECONDS] [--only paths|unet]   # on a GPU machine
#   bash bench/gpu.sh --cpu-smoke --out /tmp/gpu-smoke.md                      # here and in CI (~1 min)
#   bash bench/gpu.sh --prepare-wheels    # here, before a device run: fill .gpu-wheels/ (needs PyPI)
#
# A lent GPU machine (see docs/benchmarks.md, "GPU") has torch, transformers, accelerate and
# peft but not diffusers, pydantic, minio or bitsandbytes, and cannot reach a registry. So:
# --prepare-wheels downloads those (the versions pinned in constraints.txt, for CPython 3.12
# on x86-64 Linux) into .gpu-wheels/ (git-ignored; ~15 MB: bitsandbytes keeps only its CPU and
# CUDA 13 libraries), the device call carries that folder, and this script installs them into
# a temporary folder on PYTHONPATH when the imports fail. Without a CUDA device, use --cpu-smoke.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
wheels="${GPU_WHEELS_DIR:-$root/.gpu-wheels}"
wheel_python="${GPU_WHEELS_PYTHON:-3.12}"  # the lent machines' python3 (KINDS.md)
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"
else py="$(command -v python3)"
fi

# What a GPU machine lacks (KINDS.md's package list): the project's own needs, with their
# own dependencies that are not there either.
GPU_WHEELS=(diffusers pydantic pydantic_core annotated-types typing-inspection minio argon2-cffi
            argon2-cffi-bindings cffi pycparser pycryptodome bitsandbytes)

if [[ "${1:-}" == "--prepare-wheels" ]]; then
  pins=()
  for name in "${GPU_WHEELS[@]}"; do
    pin="$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt || true)"
    [[ -n "$pin" ]] || { echo "gpu.sh: $name is not pinned in constraints.txt" >&2; exit 1; }
    pins+=("$pin")
  done
  rm -rf "$wheels" && mkdir -p "$wheels"
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$wheel_python" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$wheels" "${pins[@]}"
  "$py" "$root/bench/gpu_wheels.py" slim "$wheels"/bitsandbytes-*.whl
  du -sh "$wheels"; ls "$wheels"
  exit 0
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [[ " $* " == *" --cpu-smoke "* ]]; then export OMP_NUM_THREADS=1; fi

# find_spec: whether they are there, without the seconds that importing them takes
all_there() { "$py" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
  ('diffusers', 'pydantic', 'pydantic_core', 'minio', 'argon2', 'Crypto', 'bitsandbytes', 'torch')))"; }
if ! all_there; then
  if compgen -G "$wheels/*.whl" >/dev/null; then
    site="$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench-site.XXXXXX")"
    echo "gpu.sh: installing $(ls "$wheels" | wc -l) carried wheels into $site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
  fi
  all_there || {
    echo "gpu.sh: packages missing; run 'bash bench/gpu.sh --prepare-wheels' where PyPI is reachable" \
         "and carry .gpu-wheels" >&2; exit 1; }
fi
if [[ -n "${site:-}" ]]; then trap 'rm -rf "$site"' EXIT; fi
"$py" "$root/bench/gpu_bench.py" "$@"
