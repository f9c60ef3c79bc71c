#!/usr/bin/env bash
# One GPU check for issue 8, under 6 minutes on an H100/H200: ViT-B/512 slices per second (fp16/bf16, batch 1..64,
# CUDA graphs, torch.compile, segment_volume end to end) and the GPU-marked pytest files (OOM halving, CPU parity).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT (default ./gpu_out)
#
# Uses whatever torch is installed. Missing Python packages are installed offline from $WHEELS (default ./wheels
# or shared/wheels) when such a folder exists; nothing is downloaded.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi not found"
PY="${PYTHON:-python3}"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" \
  || { echo "torch is not importable: install a CUDA torch first"; exit 1; }

WHEELS="${WHEELS:-}"
for candidate in wheels shared/wheels; do [ -z "$WHEELS" ] && [ -d "$candidate" ] && WHEELS="$candidate"; done
missing=$($PY - <<'EOF'
import importlib.util
need = {"segment_anything": "segment-anything", "numpy": "numpy", "SimpleITK": "SimpleITK",
        "safetensors": "safetensors", "scipy": "scipy", "pytest": "pytest"}
print(" ".join(p for m, p in need.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing: $missing"
  if [ -n "$WHEELS" ]; then
    timeout 30 $PY -m pip install -q --no-index --find-links "$WHEELS" $missing || echo "offline install failed"
  else
    echo "no wheel folder (set WHEELS=...); parts that need these will be skipped"
  fi
fi
export PYTHONPATH="$PWD/HSAMSlicer${PYTHONPATH:+:$PYTHONPATH}"
export HSAM_HOME="$OUT/hsam_home"

echo "== throughput (budget 250 s)"
timeout 280 $PY benchmarks/gpu_check.py --out "$OUT" --budget 250 || echo "gpu_check.py exited with $?"

echo "== pytest -m gpu (budget 45 s)"
if $PY -c "import pytest" 2>/dev/null; then
  timeout 45 $PY -m pytest -q -m gpu -p no:cacheprovider Testing/test_inference_gpu.py Testing/test_model_gpu.py \
    --junitxml="$OUT/gpu_pytest.xml" || echo "pytest exited with $?"
else
  echo "pytest not installed: skipped"
fi
echo "== done in $(( $(date +%s) - START )) s; results: $OUT/gpu_results.json, log: $LOG"
