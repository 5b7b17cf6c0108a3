#!/usr/bin/env bash
# Pyro's own autoguide battery, run on AutoMixtureFlow.
#
#   scripts/pyro_battery.sh PYRO_SRC [pytest args...]
#
# PYRO_SRC is a copy of Pyro's sources (a checkout or an unpacked sdist/archive of
# github.com/pyro-ppl/pyro) holding tests/infer/test_autoguide.py, tests/common.py,
# tests/conftest.py and setup.cfg. Nothing is fetched: the script copies those files into a
# temporary folder, adds AutoMixtureFlow next to AutoMultivariateNormal in every
# "auto_class"/"continuous_class" parametrize list (and to test_subsample_model's list, which
# has no AutoMultivariateNormal), runs `pytest -k AutoMixtureFlow` under Pyro's own pytest
# settings (its setup.cfg turns warnings into errors) and prints the pass count.
# With Pyro 1.9.x that is 21 lists and 69 tests. Extra arguments go to pytest (e.g. -x, -v).
#
# Environment: PYTHON (default: python) must import torch, pyro and pytest; pyro_mogflow is
# taken from this repository. KEEP=1 keeps the temporary folder and prints its path.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1/tests/infer/test_autoguide.py" ] || [ ! -f "$1/setup.cfg" ]; then
  echo "usage: $0 PYRO_SRC [pytest args...]" >&2
  echo "PYRO_SRC must hold Pyro's tests/infer/test_autoguide.py and setup.cfg" >&2
  exit 2
fi
SRC=$(cd "$1" && pwd)
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pyro_battery.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then
  echo "battery folder: $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/tests/infer"
cp "$SRC/setup.cfg" "$WORK/"
for f in tests/__init__.py tests/common.py tests/conftest.py tests/infer/__init__.py; do
  if [ -f "$SRC/$f" ]; then cp "$SRC/$f" "$WORK/$f"; else : >"$WORK/$f"; fi
done

"$PY" - "$SRC/tests/infer/test_autoguide.py" "$WORK/tests/infer/test_autoguide.py" <<'PY'
"""Add AutoMixtureFlow to the battery's parametrize lists; fail loudly if the file changed."""
import re
import sys

src = open(sys.argv[1]).read()
head = re.compile(r'@pytest\.mark\.parametrize\(\s*"(auto_class|continuous_class)",\s*\[')
out, pos, lists = [], 0, 0
for m in head.finditer(src):
    end = src.index("]", m.end())
    body = src[m.end():end]
    test = re.search(r"\ndef (\w+)\(", src[end:]).group(1)
    if re.search(r"^\s*AutoMultivariateNormal,$", body, re.M):
        new = re.sub(
            r"^(\s*)AutoMultivariateNormal,$", r"\g<0>\n\1AutoMixtureFlow,", body, count=1,
            flags=re.M,
        )
    elif test == "test_subsample_model":
        indent = re.search(r"\n(\s*)\w", body).group(1)
        new = body.rstrip() + f"\n{indent}AutoMixtureFlow,\n    "
    else:
        continue
    out.append(src[pos:m.end()] + new)
    pos = end
    lists += 1
out.append(src[pos:])
src = "".join(out)
src, n = re.subn(r"^from tests\.common import", "from pyro_mogflow import AutoMixtureFlow\n\\g<0>",
                 src, count=1, flags=re.M)
if n != 1 or lists == 0:
    sys.exit("could not find where to add AutoMixtureFlow in test_autoguide.py")
open(sys.argv[2], "w").write(src)
print(f"added AutoMixtureFlow to {lists} parametrize lists")
PY

cd "$WORK"
set +e
# Pyro's tests import `tests.common`: the battery folder comes first on the path, so this
# repository's own `tests` package does not shadow it.
PYTHONPATH="$WORK:$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
  "$PY" -m pytest -c setup.cfg --rootdir "$WORK" -p no:cacheprovider -q -rfE \
  tests/infer/test_autoguide.py -k AutoMixtureFlow "$@" | tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
set -e
summary=$(tail -n 1 "$WORK/pytest.log")
passed=$(grep -o '[0-9]* passed' <<<"$summary" | grep -o '[0-9]*' || echo 0)
total=$(grep -o '[0-9]* \(passed\|failed\|error\|errors\|skipped\|xfailed\|xpassed\)' <<<"$summary" \
  | awk '{s += $1} END {print s + 0}' || true)
echo "AutoMixtureFlow in Pyro's autoguide battery: $passed of $total passed ($(date -u +%F))"
exit "$rc"
