#!/usr/bin/env bash
# Print the path of a Python >= 3.12 on this machine, or explain and fail.
# Order: python3.13, python3.12, python3 (if new enough), then pyenv-installed versions.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for cand in python3.13 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1 && ok "$cand"; then
        command -v "$cand"; exit 0
    fi
done
if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -t. -k2,2nr -k3,3nr); do
        p="$(pyenv prefix "$v" 2>/dev/null)/bin/python3"
        if [ -x "$p" ] && ok "$p"; then echo "$p"; exit 0; fi
    done
fi
echo "error: predictor needs Python >= 3.12 and none was found (tried python3.13, python3.12," \
     "python3 and pyenv). Install one (e.g. 'pyenv install 3.12') and run make again." >&2
exit 1
