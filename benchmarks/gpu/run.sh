#!/usr/bin/env bash
# One-shot GPU check (issue 26): the one command to run on a lent GPU machine.
#
#   bash benchmarks/gpu/run.sh              # on the GPU machine, with benchmarks/gpu/bundle carried
#   bash benchmarks/gpu/run.sh --dry-run    # the same steps on this CPU, tiny scale, a few minutes
#
# 1. installs the bundle's wheels (made by benchmarks/gpu/prepare.py) with pip --no-index --no-deps
#    into a private folder put first on PYTHONPATH (nothing else is installed or changed);
# 2. runs benchmarks/gpu/gpu_check.py under a hard timeout;
# 3. leaves the report (check_gpu.md / .json, check_dryrun.* for a dry run) and a log in $OUT
#    (default benchmarks/results/). Exits non-zero if any step fails or the time runs out.
#
# Environment: OUT (report folder), PYTHON (default python3), GPU_CHECK_BUNDLE (default
# benchmarks/gpu/bundle), GPU_CHECK_TIMEOUT (seconds, default 540; 300 for a dry run).
# Other arguments go to gpu_check.py (e.g. --budget-s 300, --skip training,compile).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dry=0
pass=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=1 ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) pass+=("$arg") ;;
    esac
done

bundle="${GPU_CHECK_BUNDLE:-$here/bundle}"
out="${OUT:-$repo/benchmarks/results}"
py="${PYTHON:-python3}"
if [ "$dry" = 1 ]; then limit="${GPU_CHECK_TIMEOUT:-300}"; name=check_dryrun; else limit="${GPU_CHECK_TIMEOUT:-540}"; name=check_gpu; fi

if [ ! -f "$bundle/bundle.json" ]; then
    echo "run.sh: $bundle/bundle.json not found: run 'python benchmarks/gpu/prepare.py' on the CPU machine and carry benchmarks/gpu/bundle" >&2
    exit 2
fi
shopt -s nullglob
wheels=("$bundle"/wheels/*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" = 0 ]; then
    echo "run.sh: $bundle/wheels/ holds no wheel: prepare the bundle again" >&2
    exit 2
fi
if ! "$py" -c "import torch, numpy" 2>/dev/null; then
    echo "run.sh: $py cannot import torch and numpy (set PYTHON to the interpreter that has them)" >&2
    exit 2
fi

mkdir -p "$out"
site="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"
trap 'rm -rf "$site"' EXIT
echo "run.sh: installing ${#wheels[@]} wheel(s) into $site"
"$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$site" "${wheels[@]}"
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

args=(--bundle "$bundle" --out "$out")
[ "$dry" = 1 ] && args+=(--dry-run)
[ "${#pass[@]}" -gt 0 ] && args+=("${pass[@]}")
echo "run.sh: gpu_check.py ${args[*]} (timeout ${limit} s)"
set +e
timeout --signal=TERM --kill-after=20 "$limit" "$py" "$here/gpu_check.py" "${args[@]}" 2>&1 | tee "$out/$name.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "run.sh: gpu_check.py ran past ${limit} s and was stopped; $out/$name.md holds the sections that finished" >&2
elif [ "$rc" != 0 ]; then
    echo "run.sh: gpu_check.py failed (exit $rc); see $out/$name.log" >&2
else
    echo "run.sh: report $out/$name.md"
fi
exit "$rc"
