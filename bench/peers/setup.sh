#!/usr/bin/env bash
# Creates bench/.venv-peers with the peer systems (DBOS, Celery, FastStream, Temporal)
# and py-spy, pinned in requirements.txt. Separate from the project's .venv so that
# nothing the peers install can change what Cantata runs on.
#   bash bench/peers/setup.sh            # idempotent; PYTHON=python3.11 to choose the interpreter
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/../.venv-peers"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r "$here/requirements.txt"
"$venv/bin/python" -m pip freeze > "$here/../results/peers-versions.txt"
echo "peers venv ready: $venv"
