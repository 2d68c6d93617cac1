#!/usr/bin/env bash
# Set up .venv if needed, then run every check the project holds itself to:
# ruff (lint and format), mypy (strict), the import layers (import-linter) and pytest. Arguments go to pytest.
# Exits non-zero if any check fails; all of them run either way.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
ensure_venv '.[dev]' || exit 1

failed=()
check() {
    local name=$1
    shift
    echo "== $name" >&2
    "$@" || failed+=("$name")
}

check "ruff check" .venv/bin/ruff check .
check "ruff format" .venv/bin/ruff format --check .
check "mypy" .venv/bin/mypy
check "import layers" .venv/bin/lint-imports

echo "== pytest" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
.venv/bin/pytest -q "$@" 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("pytest")

echo
echo "pytest: $(grep -E '[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all checks passed"
