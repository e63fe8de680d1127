# Sourced by run.sh and test.sh: sets PYTHON to a working Python 3.12 interpreter.
# A plain `python3.12` is used when it runs; otherwise pyenv's 3.12 (whose shim needs the
# version named).
find_python312() {
    if command -v python3.12 >/dev/null 2>&1 && python3.12 -c "" 2>/dev/null; then
        PYTHON=$(command -v python3.12)
        return 0
    fi
    if command -v pyenv >/dev/null 2>&1; then
        local version
        version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1)
        if [ -n "$version" ]; then
            PYTHON="$(pyenv root)/versions/$version/bin/python3.12"
            [ -x "$PYTHON" ] && return 0
        fi
    fi
    echo "error: Python 3.12 not found (tried python3.12 and pyenv); install it and retry" >&2
    return 1
}

# Creates (once) the virtual environment .venv with the project installed, plus EXTRAS.
# The install is editable, so it is redone only when pyproject.toml changes (a stamp file in
# .venv per set of extras records the pyproject.toml it installed).
setup_venv() {
    local extras=$1
    find_python312 || return 1
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    VENV="$root/.venv"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating $VENV with $PYTHON" >&2
        "$PYTHON" -m venv "$VENV" || return 1
    fi
    local name=${extras//[^a-z]/} wanted
    local stamp="$VENV/.installed-${name:-base}"
    wanted=$(cksum < "$root/pyproject.toml")
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
        return 0
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root$extras" || return 1
    echo "$wanted" > "$stamp"
}
