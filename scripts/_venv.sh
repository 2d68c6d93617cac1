# Sourced by scripts/*.sh: make sure .venv exists, made with a Python the project supports.
# Usage: ensure_venv '.[dev]'   (what to pip install -e into it)

ensure_venv() {
    local spec=$1 py=""
    if [ ! -x .venv/bin/python ]; then
        for candidate in python3.11 python3; do
            if command -v "$candidate" >/dev/null 2>&1 &&
                "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))'
            then
                py=$candidate
                break
            fi
        done
        if [ -z "$py" ]; then
            echo "pacs-classifier needs Python 3.11 or 3.12 (python3.11 or python3 on PATH)" >&2
            return 1
        fi
        echo "creating .venv with $("$py" --version)" >&2
        "$py" -m venv .venv
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    fi
    # Every run, so a changed pyproject.toml is picked up; quick when nothing changed.
    # The build backend's chatter goes to a log, shown only when the install fails.
    if ! .venv/bin/python -m pip install -q -e "$spec" >.venv/pip-install.log 2>&1; then
        tail -n 30 .venv/pip-install.log >&2
        echo "pip install -e '$spec' failed (full log: .venv/pip-install.log)" >&2
        return 1
    fi
}
