#!/usr/bin/env bash
# The test command of the README: fetch what the tests read (SmolLM2 + corpora), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/fetch_assets.py smollm2 corpora
cargo test --workspace --all-targets --no-fail-fast
