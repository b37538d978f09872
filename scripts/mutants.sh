#!/bin/sh
# Fault injection: proves that the tests notice the faults they exist to
# catch. Copies the tree (tracked and untracked, not ignored, files) into a
# scratch folder, builds it once, runs the test command there (every meson
# suite, then `flexattn check` on the CPU), then for each fault below
# applies it with sed, rebuilds what changed, runs the test command again,
# reports the suites and check cases that passed before and fail now, and
# reverts it.
#
# A fault that no test catches SURVIVES: the exit status is then 1. A fault
# whose sed no longer matches the code is an error (status 2): update its
# expression here. The run time is printed last.
#   scripts/mutants.sh [NAME...]     (names: see the list below; default all)
# MUTANTS_DIR keeps the scratch folder there (default: a temporary one,
# removed at the end); MUTANTS_JOBS sets ninja's and meson's parallelism.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
start=$(date +%s)
jobs=${MUTANTS_JOBS:-$(nproc 2>/dev/null || echo 2)}
if [ -n "${MUTANTS_DIR:-}" ]; then
    work=$MUTANTS_DIR
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi

# name @ file @ sed expression @ what the fault is
faults='c_remainder@core/mod/ir.c@/^static int32_t int_mod/,/^}/s/if (r != 0 .*r += b;/(void)0;/@int % with the sign of C (the dividend) instead of Python (the divisor)
fold_mod_2@core/mod/fold.c@s/(is_int_const(m, b, 1) || is_int_const(m, b, -1))/(is_int_const(m, b, 1) || is_int_const(m, b, -1) || is_int_const(m, b, 2))/@folding x % 2 -> 0
fold_floordiv_2@core/mod/fold.c@s/if (type != IR_FLOAT \&\& is_int_const(m, b, 1)) return a;/if (type != IR_FLOAT \&\& (is_int_const(m, b, 1) || is_int_const(m, b, 2))) return a;/@folding x // 2 -> x
scale_16bit_out@backends/cpu/cpu_forward.c@s/l != 0.0f ? orow\[c\] \* inv : 0.0f);/l != 0.0f ? orow[c] * inv * 1.001f : 0.0f);/@every f16/bf16 output of the CPU forward scaled by 1.001
lse_offset@backends/cpu/cpu_forward.c@s/= flex_softmax_lse(sc->m\[r\], l);/= flex_softmax_lse(sc->m[r], l) + 1e-3f;/@the LSE offset by 1e-3
skip_partial_block@backends/cpu/cpu_forward.c@s/for (int32_t i = mask->kv_partial.offsets\[row\]; i/for (int32_t i = mask->kv_partial.offsets[row] + 1; i/@the first partial kv block of every block row skipped
tanh_derivative@core/mod/derive.c@s/mul(st, A, sub(st, fconst(st, 1.0f), mul(st, self, self)))/mul(st, A, mul(st, fconst(st, 1.01f), sub(st, fconst(st, 1.0f), mul(st, self, self))))/@the derivative of tanh off by a factor of 1.01
score_mask_nan@core/mod/interval.c@s/if (!res->nan \&\& res->fhi == -INFINITY) return MOD_TRI_FALSE;/if (res->fhi == -INFINITY) return MOD_TRI_FALSE;/@a block of a score mod taken as masked where the mod may give NaN
score_mask_undecided@core/scoremask.c@s/if (t == MOD_TRI_TRUE || (i1 - i0 == 1 \&\& j1 - j0 == 1)) return;/if (t != MOD_TRI_TRUE \&\& i1 - i0 == 1 \&\& j1 - j0 == 1) { w->masked[i0 * w->nk + j0] = 1; w->count++; } if (t == MOD_TRI_TRUE || (i1 - i0 == 1 \&\& j1 - j0 == 1)) return;/@every block the score-mod analysis cannot decide skipped as masked'

echo "== copying the tree to $work/src"
rm -rf "$work/src"
mkdir -p "$work/src"
# -m: every file is newer than what an earlier run built from it, so a
# reused build folder never keeps an object of a fault.
(cd "$root" && git ls-files -z -c -o --exclude-standard | tar --null -T - -cf -) |
    tar -C "$work/src" -m -xf -
rm -f "$work/survivors"
echo "== building (debugoptimized, no sanitizers)"
[ -f "$work/build/build.ninja" ] ||
    meson setup "$work/build" "$work/src" -Dbuildtype=debugoptimized >"$work/setup.log"
ninja -C "$work/build" -j "$jobs" >"$work/build.log"

# Runs the test command; writes "suite RESULT" lines and "check: CASE" lines
# (the cases check failed) into $1.
run_tests() {
    meson test -C "$work/build" --no-rebuild --num-processes "$jobs" >"$work/meson.out" 2>&1 || true
    python3 - "$work/build/meson-logs/testlog.json" >"$1" <<'PY'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    e = json.loads(line)
    print(e["name"], e["result"])
PY
    FLEXATTN_CACHE_DIR=off "$work/build/tools/flexattn" check >"$work/check.out" 2>&1 || true
    # the case name is the 42 columns after "FAIL  cpu   "
    grep '^FAIL ' "$work/check.out" | cut -c13-54 | sed 's/ *$//; s/^/check: /' >>"$1"
    tail -1 "$work/check.out" | sed 's/^/check summary: /' >>"$1"
}

echo "== baseline"
run_tests "$work/baseline.txt"
grep -v ' OK$' "$work/baseline.txt" | sed 's/^/  not passing before any fault: /' || true

wanted="$*"
survived=0
echo "$faults" | while IFS='@' read -r name file expr what; do
    if [ -n "$wanted" ] && ! echo " $wanted " | grep -q " $name "; then continue; fi
    t0=$(date +%s)
    cp "$work/src/$file" "$work/original"
    if ! sed "$expr" "$work/original" >"$work/src/$file"; then
        echo "ERROR $name: the sed expression is malformed"
        cp "$work/original" "$work/src/$file"
        exit 2
    fi
    if cmp -s "$work/original" "$work/src/$file"; then
        echo "ERROR $name: the sed expression no longer matches $file"
        cp "$work/original" "$work/src/$file"
        exit 2
    fi
    if ! ninja -C "$work/build" -j "$jobs" >"$work/build-$name.log" 2>&1; then
        echo "ERROR $name: the fault does not build (see $work/build-$name.log)"
        cp "$work/original" "$work/src/$file"
        exit 2
    fi
    run_tests "$work/$name.txt"
    cp "$work/original" "$work/src/$file"
    # caught by: suites OK before and not now; check cases failing now only
    caught=$(grep ' OK$' "$work/baseline.txt" | cut -d' ' -f1 | while read -r suite; do
        grep -q "^$suite OK$" "$work/$name.txt" || printf '%s ' "$suite"
    done)
    new_check=$(grep '^check: ' "$work/$name.txt" | while read -r line; do
        grep -qxF "$line" "$work/baseline.txt" || echo "$line"
    done | wc -l)
    [ "$new_check" -gt 0 ] && caught="${caught}check($new_check cases)"
    if [ -n "$caught" ]; then
        echo "caught   $name: $what -- by: $caught ($(($(date +%s) - t0)) s)"
    else
        echo "SURVIVED $name: $what ($(($(date +%s) - t0)) s)"
        echo "$name" >>"$work/survivors"
    fi
done || exit $?
ninja -C "$work/build" -j "$jobs" >/dev/null # back to the unmodified tree
[ -f "$work/survivors" ] && survived=$(wc -l <"$work/survivors")
echo "mutants: $survived survived; run time $(($(date +%s) - start)) s"
[ "$survived" -eq 0 ]
