#!/usr/bin/env bash
# Official-code parity: run the authors' own training code and gradmod's official-parity modes
# side by side and print the comparison summaries (see README.md in this folder).
#
#   CGGM_SRC=... OGM_SRC=... AGM_SRC=... MLB_SRC=... PY=/path/to/venv/bin/python \
#     bash benchmarks/parity/run.sh
#
# Environment:
#   CGGM_SRC, OGM_SRC, AGM_SRC, MLB_SRC  extracted official sources (required; see README.md)
#   MMPARETO_SRC  extracted GeWu-Lab/MMPareto_ICML2024 (optional: its stage is skipped without it)
#   BML_SRC   extracted GeWu-Lab/BML_TPAMI2024 (optional: the OPM / revised OGM formula check)
#   INFOREG_SRC  extracted GeWu-Lab/InfoReg_CVPR2025 (optional: its formula check is skipped
#             without it)
#   PY        interpreter with torch, scikit-learn and einops (default: python)
#   OUT       output folder (default: results/parity in this checkout; gitignored)
#   RERECORD  1: re-record the official traces even if OUT already holds them
# gradmod is imported from the checkout this script lives in (its root goes first on PYTHONPATH).
# The official traces do not depend on gradmod: they are recorded once into OUT and reused (a CGGM
# trace is re-recorded when it does not hold 16 steps). Full outputs go to OUT; only the summary
# lines are printed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
: "${CGGM_SRC:?set CGGM_SRC to an extracted copy of zrguo/CGGM (see benchmarks/parity/README.md)}"
: "${OGM_SRC:?set OGM_SRC to an extracted copy of GeWu-Lab/OGM-GE_CVPR2022 (see benchmarks/parity/README.md)}"
: "${AGM_SRC:?set AGM_SRC to an extracted copy of lihong2303/AGM_ICCV2023 (see benchmarks/parity/README.md)}"
: "${MLB_SRC:?set MLB_SRC to an extracted copy of kkontras/MLB (see benchmarks/parity/README.md)}"
export CGGM_SRC OGM_SRC AGM_SRC MLB_SRC
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# one BLAS thread on both sides: the thread count alone moves the official run's final parameters
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
PY="${PY:-python}"
OUT="${OUT:-$ROOT/results/parity}"
STEPS=16
OFF_CGGM="$OUT/off_cggm16.pt"
OFF_OGM="$OUT/off_ogm.pt"

for d in "$CGGM_SRC" "$OGM_SRC" "$AGM_SRC" "$MLB_SRC"; do
  [ -d "$d" ] || { echo "missing directory: $d" >&2; exit 2; }
done
"$PY" -c "import torch, sklearn, einops" || { echo "interpreter $PY lacks torch/sklearn/einops" >&2; exit 2; }
mkdir -p "$OUT"

# what is being tested (read-only git: no index refresh written into the checkout)
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  head=$(git --no-optional-locks -C "$ROOT" rev-parse --short HEAD)
  dirty=$(git --no-optional-locks -C "$ROOT" status --porcelain --untracked-files=no | wc -l)
  echo "== gradmod checkout $ROOT at $head, $dirty modified tracked file(s)"
fi
"$PY" -c "import gradmod, torch; print('== gradmod from', gradmod.__file__, '| torch', torch.__version__)"

# official traces (only when needed)
cggm_ok() {
  [ -f "$OFF_CGGM" ] && "$PY" - "$OFF_CGGM" "$STEPS" <<'EOF'
import sys, torch
o = torch.load(sys.argv[1], weights_only=False)
n = int(sys.argv[2])
sys.exit(0 if len(o["train"]) == n and len(o["trace"]) == n else 1)
EOF
}
if [ "${RERECORD:-0}" = 1 ] || ! cggm_ok; then
  echo "== recording the official CGGM trace ($STEPS steps) -> $OFF_CGGM"
  "$PY" "$HERE/official_trace.py" cggm "$OFF_CGGM" "$STEPS" > "$OUT/off_cggm16.log" 2>&1 \
    || { echo "official CGGM run failed; last lines of $OUT/off_cggm16.log:" >&2; tail -8 "$OUT/off_cggm16.log" >&2; exit 1; }
  cggm_ok || { echo "official CGGM trace does not hold $STEPS steps" >&2; exit 1; }
else
  echo "== reusing the official CGGM trace $OFF_CGGM (RERECORD=1 to re-record)"
fi
if [ "${RERECORD:-0}" = 1 ] || [ ! -f "$OFF_OGM" ]; then
  echo "== recording the official OGM trace (OGM, alpha 0.8) -> $OFF_OGM"
  "$PY" "$HERE/official_trace.py" ogm "$OFF_OGM" OGM 0.8 > "$OUT/off_ogm.log" 2>&1 \
    || { echo "official OGM run failed; last lines of $OUT/off_ogm.log:" >&2; tail -8 "$OUT/off_ogm.log" >&2; exit 1; }
else
  echo "== reusing the official OGM trace $OFF_OGM (RERECORD=1 to re-record)"
fi

summary() { grep -E '^(largest|\[)' "$1" | grep -v 'pre-clip' || true; }
failed=()
fail() { echo "!! $1 failed; last lines of $2:"; tail -8 "$2"; failed+=("$1"); }

echo "== CGGM official=True, $STEPS steps"
rm -f "$OUT/gm_cggm16.pt"
if "$PY" "$HERE/gradmod_cggm_run.py" "$OFF_CGGM" "$OUT/gm_cggm16.pt" > "$OUT/gm_cggm16.log" 2>&1; then
  "$PY" "$HERE/compare.py" cggm "$OFF_CGGM" "$OUT/gm_cggm16.pt" > "$OUT/cmp_cggm16.txt" 2>&1 \
    || fail "CGGM compare" "$OUT/cmp_cggm16.txt"
  summary "$OUT/cmp_cggm16.txt"
else
  fail "gradmod CGGM run" "$OUT/gm_cggm16.log"
fi

echo "== OGM (no GE noise, params=conv, alpha 0.8)"
rm -f "$OUT/gm_ogm.pt"
if "$PY" "$HERE/gradmod_ogm_run.py" "$OFF_OGM" "$OUT/gm_ogm.pt" > "$OUT/gm_ogm.log" 2>&1; then
  "$PY" "$HERE/compare.py" ogm "$OFF_OGM" "$OUT/gm_ogm.pt" > "$OUT/cmp_ogm.txt" 2>&1 \
    || fail "OGM compare" "$OUT/cmp_ogm.txt"
  summary "$OUT/cmp_ogm.txt"
else
  fail "gradmod OGM run" "$OUT/gm_ogm.log"
fi

echo "== formula_check (official coefficient lines exec'd on the same inputs)"
"$PY" "$HERE/formula_check.py" > "$OUT/formula_check.txt" 2>&1 || fail "formula_check" "$OUT/formula_check.txt"
grep -v -E '^(Traceback|  )' "$OUT/formula_check.txt" | grep -E 'vs |CGGM all' || true

echo "== mmpareto_formula (official MMPareto lines exec'd on the same gradients)"
if [ -n "${MMPARETO_SRC:-}" ]; then
  if [ -d "$MMPARETO_SRC/code" ]; then
    MMPARETO_SRC="$MMPARETO_SRC" "$PY" "$HERE/mmpareto_formula.py" > "$OUT/mmpareto_formula.txt" 2>&1 \
      || fail "mmpareto_formula" "$OUT/mmpareto_formula.txt"
    grep -E '^(formula|step|  )' "$OUT/mmpareto_formula.txt" | grep -v -E '^  File' || true
  else
    fail "mmpareto_formula (MMPARETO_SRC=$MMPARETO_SRC has no code/)" /dev/null
  fi
else
  echo "skipped: set MMPARETO_SRC to an extracted copy of GeWu-Lab/MMPareto_ICML2024"
fi

if [ -n "${BML_SRC:-}" ]; then
  echo "== opm_formula (OPM / revised OGM of BML_TPAMI2024, official lines exec'd on the same inputs)"
  [ -d "$BML_SRC" ] || { echo "missing directory: $BML_SRC" >&2; exit 2; }
  export BML_SRC
  "$PY" -W ignore "$HERE/opm_formula.py" > "$OUT/opm_formula.txt" 2>&1 || fail "opm_formula" "$OUT/opm_formula.txt"
  grep -E ' vs |leak on|rounds to|^vector: s|^vector: q' "$OUT/opm_formula.txt" || true
else
  echo "== opm_formula skipped (set BML_SRC to an extracted GeWu-Lab/BML_TPAMI2024)"
fi
echo "== inforeg_formula (official InfoReg lines exec'd on the same inputs)"
if [ -n "${INFOREG_SRC:-}" ]; then
  [ -d "$INFOREG_SRC" ] || { echo "missing directory: $INFOREG_SRC" >&2; exit 2; }
  INFOREG_SRC="$INFOREG_SRC" "$PY" "$HERE/inforeg_formula.py" > "$OUT/inforeg_formula.txt" 2>&1 \
    || fail "inforeg_formula" "$OUT/inforeg_formula.txt"
  grep -E ' vs |zero denominator' "$OUT/inforeg_formula.txt" || true
else
  echo "skipped: set INFOREG_SRC to an extracted copy of GeWu-Lab/InfoReg_CVPR2025"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "== FAILED: ${failed[*]}"; exit 1
fi
echo "== all stages ran; full outputs in $OUT"
