# Sourced by the other scripts: make sure .venv exists with the project and its test tools.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${RLMQ_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
stamp="$VENV/.rlmq-installed"
if [ ! -x "$PY" ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up $VENV (first run only)..." >&2
  log="$(mktemp -t rlmq-install.XXXXXX)"
  # The default (lenient) editable mode: its finder maps the one name `rlmq` to the checkout.
  # Compat mode would put the checkout itself on sys.path, and with it the four folders as
  # top-level names (protocol, sandbox, ...), which a library must not install.
  if ! { python3 -m venv "$VENV" &&
         "$PY" -m pip install --upgrade pip &&
         "$PY" -m pip install -e ".[test]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "installing rlmq into $VENV failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
