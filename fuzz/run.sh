#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each: installs cargo-fuzz when missing, builds, fuzzes.
# Exits non-zero on a finding (the input is kept in fuzz/artifacts/<target>/) or a build error.
#
#   fuzz/run.sh 60        # CI: about 30 s install + 15 s build + 60 s per target on 2 cores
#
# libFuzzer via cargo fuzz on stable rustc: the targets are safe Rust, so they build without a
# sanitizer (--sanitizer none needs no nightly flags). FUZZ_SANITIZER=address switches ASan on,
# which needs RUSTC_BOOTSTRAP=1 on a stable toolchain (set below).
set -euo pipefail

seconds=${1:?usage: fuzz/run.sh SECONDS}
case $seconds in '' | *[!0-9]*) echo "SECONDS must be a number" >&2; exit 2 ;; esac
cd "$(dirname "$0")"

sanitizer=${FUZZ_SANITIZER:-none}
if [ "$sanitizer" != none ]; then
    export RUSTC_BOOTSTRAP=1
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    timeout 300 cargo install cargo-fuzz --locked --version 0.13.2
fi

timeout 600 cargo fuzz build --sanitizer "$sanitizer"

status=0
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target"
    log=$(mktemp)
    seeds=()
    [ -d "seeds/$target" ] && seeds=("seeds/$target")
    dict=()
    [ -f "dict/$target.dict" ] && dict=("-dict=dict/$target.dict")
    # corpus/ collects what the fuzzer learns (not committed); seeds/ is read as a start.
    if timeout $((seconds + 120)) cargo fuzz run --sanitizer "$sanitizer" "$target" \
        "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 "${dict[@]}" >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        status=1
        tail -n 60 "$log"
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    echo "fuzz: $target ${seconds}s executions=${execs:-?} $result"
    rm -f "$log"
done
exit $status
