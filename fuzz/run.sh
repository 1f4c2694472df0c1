#!/usr/bin/env bash
# Builds and runs every fuzz target for a bounded time.
#
#   fuzz/run.sh [SECONDS_PER_TARGET]          (default 60)
#
# For each target: first replays fuzz/regressions/<target>/ (inputs of past findings: each must
# pass), then fuzzes for SECONDS_PER_TARGET with libFuzzer (-max_total_time), starting from
# fuzz/seeds/<target>/ (committed) and fuzz/corpus/<target>/ (kept between runs, gitignored);
# new interesting inputs go to fuzz/corpus/<target>/. A finding (panic, failed check, sanitizer
# report, timeout, out-of-memory) leaves its input in fuzz/artifacts/<target>/ and makes the
# script exit non-zero after the other targets ran. Logs: fuzz/logs/<target>.log.
#
# Needs: cargo and a C++ compiler (libfuzzer-sys builds libFuzzer), and cargo-fuzz, which this
# script installs with `cargo install cargo-fuzz --locked` when it is missing. A stable
# toolchain is enough: RUSTC_BOOTSTRAP=1 lets it take the -Z flags cargo-fuzz passes
# (-Zsanitizer=address and the coverage options); nightly works as well.
#
# Environment:
#   FUZZ_TARGETS="rewrite sale_parse"  only these targets (default: all of fuzz/fuzz_targets/)
#   FUZZ_PARALLEL=2                    run this many targets at once (default 1; one core each,
#                                      except http_front, which mostly waits on sockets)
#   FUZZ_SANITIZER=none                no AddressSanitizer (faster; default address)
#   FUZZ_ARGS="-dict=..."              more libFuzzer options for every target
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$fuzz_dir")"
sanitizer="${FUZZ_SANITIZER:-address}"
parallel="${FUZZ_PARALLEL:-1}"
export RUSTC_BOOTSTRAP=1

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    targets=()
    for f in "$fuzz_dir"/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# -O: optimised; -a: with debug assertions and overflow checks, so an overflow is a finding.
build_flags=(-O -a --sanitizer "$sanitizer" --fuzz-dir "$fuzz_dir")

echo "== building ${targets[*]} (sanitizer: $sanitizer)"
(cd "$root" && cargo fuzz build "${build_flags[@]}")

mkdir -p "$fuzz_dir/logs"
data_root="$(mktemp -d "${TMPDIR:-/tmp}/pos-crm-proxy-fuzz.XXXXXX")"
trap 'rm -rf "$data_root"' EXIT

# libFuzzer options per target.
target_args() {
    case "$1" in
        # Larger inputs, so sale bodies and POS answers pass the 4 KiB limits of its config.
        http_front) echo "-max_len=12288 -timeout=30 -dict=$fuzz_dir/dict/http.dict" ;;
        rewrite) echo "-max_len=8192 -timeout=20 -dict=$fuzz_dir/dict/json.dict" ;;
        sale_parse) echo "-max_len=4096 -timeout=20 -dict=$fuzz_dir/dict/json.dict" ;;
        config) echo "-max_len=4096 -timeout=20 -dict=$fuzz_dir/dict/toml.dict" ;;
        *) echo "-timeout=20" ;;
    esac
}

# Replays the regression inputs of one target; each must pass now.
replay() {
    local t="$1" dir="$fuzz_dir/regressions/$1"
    [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] || return 0
    echo "== $t: replaying $(ls "$dir" | wc -l) regression input(s)"
    local f ok=0
    for f in "$dir"/*; do
        [ -f "$f" ] || continue
        [[ "$f" == *.md ]] && continue
        if ! (cd "$root" && FUZZ_DATA_DIR="$data_root" cargo fuzz run "${build_flags[@]}" "$t" "$f" \
            -- -runs=1 $(target_args "$t")) >>"$fuzz_dir/logs/$t.regressions.log" 2>&1; then
            echo "!! $t: regression input $f fails again (see fuzz/logs/$t.regressions.log)"
            ok=1
        fi
    done
    return $ok
}

run_one() {
    local t="$1" log="$fuzz_dir/logs/$1.log"
    echo running >"$fuzz_dir/logs/$t.status"
    mkdir -p "$fuzz_dir/corpus/$t" "$fuzz_dir/artifacts/$t"
    local seeds=()
    [ -d "$fuzz_dir/seeds/$t" ] && seeds=("$fuzz_dir/seeds/$t")
    echo "== $t: fuzzing for ${seconds}s (log: fuzz/logs/$t.log)"
    local rc=0
    (cd "$root" && FUZZ_DATA_DIR="$data_root" cargo fuzz run "${build_flags[@]}" "$t" \
        "$fuzz_dir/corpus/$t" "${seeds[@]}" \
        -- -max_total_time="$seconds" -print_final_stats=1 $(target_args "$t") ${FUZZ_ARGS:-}) \
        >"$log" 2>&1 || rc=$?
    local done_line
    done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)"
    if [ "$rc" -ne 0 ]; then
        echo "!! $t: FINDING (exit $rc); input in fuzz/artifacts/$t/, details in fuzz/logs/$t.log:"
        { grep -E -A1 "panicked at" "$log" | head -4
          grep -E "ERROR: |SUMMARY: |^Error: |^Test unit written to|^artifact_prefix" "$log" | head -4
        } | sed 's/^/   /' || true
        echo finding >"$fuzz_dir/logs/$t.status"
        return 1
    fi
    echo ok >"$fuzz_dir/logs/$t.status"
    echo "ok $t: ${done_line:-no final line}"
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" | sed 's/^/   /' || true
}

failed=()
for t in "${targets[@]}"; do
    replay "$t" || failed+=("$t (regression)")
done

for t in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do
        sleep 1
    done
    run_one "$t" &
done
wait
for t in "${targets[@]}"; do
    [ "$(cat "$fuzz_dir/logs/$t.status" 2>/dev/null)" = ok ] || failed+=("$t")
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi
echo "== all ${#targets[@]} targets ran ${seconds}s each without a finding"
