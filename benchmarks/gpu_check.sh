#!/usr/bin/env bash
# GPU check for personaxis on a machine with one NVIDIA GPU (see benchmarks/gpu_check.py for what it measures).
#
#   benchmarks/gpu_check.sh [--json results.json] [--model DIR] [--sections quick,split,llama-3-8b,qwen3-32b]
#
# Needs torch with CUDA, transformers, accelerate, safetensors, scikit-learn, matplotlib, tqdm and pydantic: an
# installed personaxis (`pip install -e .`) has them. Without network, missing pure-Python packages are taken from
# wheels in .gpu_carry/wheels when that folder exists, and personaxis itself from src/. Nothing is downloaded.
# Finishes in under 5 minutes (sections that do not fit the budget are skipped and reported as such).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.version.cuda)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

missing=$($PY - <<'PYEOF'
import importlib.util
names = ["pydantic", "platformdirs", "transformers", "accelerate", "safetensors", "sklearn", "matplotlib", "tqdm"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
PYEOF
)
if [ -n "$missing" ]; then
    echo "missing packages: $missing"
    if compgen -G ".gpu_carry/wheels/*.whl" > /dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/personaxis-site \
            .gpu_carry/wheels/*.whl
        export PYTHONPATH="/tmp/personaxis-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
if ! $PY -c 'import personaxis' 2>/dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c 'import personaxis.pipeline, transformers; print("personaxis from", personaxis.__file__, "| transformers", transformers.__version__)'

timeout "${GPU_CHECK_TIMEOUT:-295}" $PY benchmarks/gpu_check.py --budget "${GPU_CHECK_BUDGET:-270}" "$@"
