#!/usr/bin/env bash
# The GPU figures of issue 20 on a lent GPU machine, in under 5 minutes; prints one markdown table.
#   (a) extract() of ViT-B/16 at batch 256, bf16 autocast, JPEGs decoded on the GPU, vs its raw bf16 forward
#   (b) the linear probe's whole protocol on 1.28M x 1152 float32 features, 1000 classes, on the GPU
# Installs nothing: it runs on the machine's own python3 (PyTorch, torchvision, timm, scikit-learn) with this
# working tree on PYTHONPATH. Extra arguments go to benchmarks/gpu_check.py (e.g. --parts probe, --rows 640000).
#     bash benchmarks/gpu_check.sh                    # table also written to $OUT/gpu_check.md when OUT is set
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LIMIT=${GPU_CHECK_TIMEOUT:-290}   # seconds for the whole python run (the issue's budget: < 5 minutes)

if ! command -v nvidia-smi >/dev/null; then
  echo "gpu_check: no nvidia-smi on this machine: not a GPU machine, nothing measured" >&2; exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || {
  echo "gpu_check: nvidia-smi found no GPU" >&2; exit 2; }
"$PY" - <<'PY' || exit 2
import importlib, sys
missing = []
for name in ("torch", "torchvision", "timm", "sklearn", "filelock", "safetensors", "tqdm", "PIL"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu_check: this python lacks " + ", ".join(missing) + " (carry wheels: /work/.library/device/README.md)")
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
PY
out_args=()
if [ -n "${OUT:-}" ]; then out_args=(--out "$OUT/gpu_check.md"); fi
timeout -k 10 "$LIMIT" "$PY" benchmarks/gpu_check.py --device cuda "${out_args[@]}" "$@"
rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  echo "gpu_check: stopped at its ${LIMIT} s limit; the rows above are the ones that finished" >&2
fi
exit $rc
