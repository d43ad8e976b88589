# Sourced by the set-up scripts: makes .venv (Python 3.11) and installs the project into it.
# Idempotent: a venv whose install stamp matches pyproject.toml is reused as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FHE_BENTO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
stamp="$VENV/.fhe-bento-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[server,aws,test,bench]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
