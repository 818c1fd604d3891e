#!/usr/bin/env bash
# One device call that qualifies a GPU machine (tools/gpu_check.py) on the lent image, which has
# no megatron-core and no network: install the GPU kit (.whl/, `make gpu-kit`) into a target
# directory on PYTHONPATH, print the device and versions, run every check inside the call's
# limit, and leave at most 8 files in $OUT (a device call returns no more):
#   versions.txt  gpu_check.log  report.json  report.md  logs.tar.gz (every check's log)
#
#   device run (repo root, carry [".whl"], timeout_s 600):  bash scripts/device/gpu-check.sh
#   the CPU image environment (`make test-image`, CI):
#       PYTHON=.venv-image/bin/python OUT=runs/image-check bash scripts/device/gpu-check.sh --tiny
#
# Arguments go to gpu_check.py (e.g. --tiny, --checks cycle,trainer). Environment: PYTHON
# (python3), OUT (required), KIT (the wheels: .whl), SITE (where they go), DEADLINE_S (540:
# install, checks and packing all end by then; the device limit is 600 s a call).
# Exit status: gpu_check's (0 all passed, 1 a check failed, 124 stopped at the deadline),
# 3 the kit did not install, 4 more than 8 files in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:?set OUT to the directory the device call returns}
KIT=${KIT:-.whl}
SITE=${SITE:-/tmp/megatron-mesh-kit}
DEADLINE_S=${DEADLINE_S:-540}
PACK_S=20  # packing the report and logs after gpu_check stops
mkdir -p "$OUT"

shopt -s nullglob
wheels=("$KIT"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "error: no wheels in $KIT/: run 'make gpu-kit' here and carry .whl" >&2
  exit 3
fi
# compiled at install (no --no-compile): megatron's modules then never print Python 3.12's
# SyntaxWarnings for their docstrings when first imported
"$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-cache-dir \
  --upgrade --target "$SITE" "${wheels[@]}" || { echo "error: installing $KIT/*.whl into $SITE failed" >&2; exit 3; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
  date -u +"%Y-%m-%dT%H:%M:%SZ  $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| gpus', torch.cuda.device_count())"
  "$PYTHON" -m pip list --disable-pip-version-check --path "$SITE" 2>/dev/null | tail -n +3 | sed 's/^/kit: /'
} 2>&1 | tee "$OUT/versions.txt"

work=$(mktemp -d)
left=$((DEADLINE_S - SECONDS - PACK_S))
budget=$((left - 30))  # checks past the budget fail; the one running then gets 30 s to end
echo "gpu_check: budget ${budget} s, stopped at ${left} s"
timeout -k 10 "$left" "$PYTHON" tools/gpu_check.py --out "$work" --budget-s "$budget" "$@" 2>&1 \
  | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "gpu_check stopped at ${left} s; report.json holds the checks that ended"

cp "$work"/report.json "$work"/report.md "$OUT"/ 2>/dev/null
[ -d "$work/logs" ] && tar -czf "$OUT/logs.tar.gz" -C "$work" logs
rm -rf "$work"
files=$(find "$OUT" -type f | wc -l)
if [ "$files" -gt 8 ]; then
  echo "error: $files files in $OUT; a device call returns 8" >&2
  exit 4
fi
echo "gpu-check.sh: exit $status after ${SECONDS} s; $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$status"
