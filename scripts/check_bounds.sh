#!/usr/bin/env bash
# Bottom-of-range check of pyproject.toml's dependency bounds, by hand only (never from CI: .ci/run does not call
# it, and under CI=true it exits at once). It rebuilds a venv on Python 3.10 (the oldest requires-python allows) in
# which every `>=` lower bound of [project.dependencies] and the `test` extra is pinned with `==`, then runs the
# smoke subset that exercises the internals we reach into (transformers' cache and generate, Lightning's CLI,
# loops and strategies, PEFT, FSDP2/DDP on CPU ranks) plus the tests of the other pinned libraries.
# Expect about 4 GB of downloads (torch and its CUDA wheels) and 15 to 20 minutes on 2 cores.
#
# Usage: scripts/check_bounds.sh [VENV_DIR]        default VENV_DIR: /tmp/venv-low
#   PYTHON=/path/to/python3.10 scripts/check_bounds.sh   to choose the interpreter
#   Extra arguments after VENV_DIR go to pytest (e.g. -x, -k name).
set -euo pipefail

if [ -n "${CI:-}" ]; then
  echo "check_bounds.sh: a manual check, not run in CI" >&2
  exit 0
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-/tmp/venv-low}
shift || true

SMOKE=(
  tests/test_speechllm.py tests/test_sublayers.py tests/test_layer_mask.py tests/test_module.py
  tests/test_fit_cli.py tests/test_healing_module.py tests/test_healing_replacement.py tests/test_efficiency.py
  tests/test_checkpoint.py tests/test_sharded.py tests/test_preemption.py tests/test_datamodule.py
  tests/test_export.py tests/test_evaluation.py tests/test_convert_ct2.py tests/test_data_manifest.py
  tests/test_synth.py tests/test_compare.py tests/test_redundancy_callback.py tests/test_prepare.py
)

find_python310() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  if python3.10 -c "" >/dev/null 2>&1; then command -v python3.10; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    local candidate
    for candidate in "$(pyenv root)"/versions/3.10.*/bin/python3.10; do
      if [ -x "$candidate" ]; then echo "$candidate"; return; fi
    done
  fi
  echo "check_bounds.sh: no Python 3.10 found; set PYTHON=/path/to/python3.10" >&2
  exit 2
}

PY=$(find_python310)
echo "interpreter: $PY ($("$PY" --version 2>&1))"

if [ -e "$VENV" ]; then
  if [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "check_bounds.sh: $VENV exists and is not a venv; not removing it" >&2
    exit 2
  fi
  rm -rf "$VENV"
fi
"$PY" -m venv "$VENV"

# Every ">=" lower bound of the runtime and test requirements, as "name[extras]==version".
mapfile -t PINS < <("$VENV/bin/python" - "$ROOT/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10: the tomli that pip vendors
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for line in project["dependencies"] + project["optional-dependencies"]["test"]:
    req = Requirement(line)
    lower = [spec.version for spec in req.specifier if spec.operator == ">="]
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    print(f"{req.name}{extras}=={lower[0]}" if lower else line)
EOF
)
if [ "${#PINS[@]}" -eq 0 ]; then echo "check_bounds.sh: no requirements read from pyproject.toml" >&2; exit 2; fi
echo "pins: ${PINS[*]}"

"$VENV/bin/pip" install -q -e "$ROOT[test]" "${PINS[@]}"
"$VENV/bin/pip" check
"$VENV/bin/pip" list --format=freeze 2>/dev/null | grep -iE \
  "^(torch|torchaudio|lightning|transformers|peft|jsonargparse|torchmetrics|tokenizers|huggingface-hub|numpy)==" || true

cd "$ROOT"
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider --timeout 900 -m "not slow" "${SMOKE[@]}" "$@"
