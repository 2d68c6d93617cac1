#!/usr/bin/env bash
# Set up .venv if needed and run the end-to-end demo. Arguments go to `pacs-classifier demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
ensure_venv '.'
exec .venv/bin/pacs-classifier demo "$@"
