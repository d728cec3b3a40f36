#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds each (default 60) and prints executions and
# crashes per target, the figures docs/reliability.md records. Needs nightly and cargo-fuzz
# (`cargo install cargo-fuzz`). Crashes are written to fuzz/artifacts/<target>/.
#
#     bash fuzz/run_all.sh 3600          # an hour each, the full-length run
#     bash fuzz/run_all.sh 30 gguf rdata # some targets
set -euo pipefail
cd "$(dirname "$0")"
# The loaders look for tokenizers in the assets folder; the fuzzed files must not reach for a
# 30 MB tokenizer.json on every input, so point them at an empty one.
export SAE_ASSETS="$PWD/target/no-assets"
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -O
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="artifacts/$t/last_run.log"
  set +e
  cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=4096 -malloc_limit_mb=2048 -timeout=20 \
    -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  crashes=$(find "artifacts/$t" -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' | wc -l)
  echo "$t: ${execs} executions in ${secs} s, exit ${rc}, ${crashes} crash/oom/timeout files"
done
