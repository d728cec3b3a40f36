#!/usr/bin/env bash
# Optional speed-up: the forward pass sends its weight products through OpenBLAS when the shared
# library is on the system (1.3-1.4x on these 2-core machines; see cpu-blas/src/lib.rs).
# Installs Debian's package when we may; without it everything still runs on candle's matmul.
if ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null) \
    && exit 0
fi
echo "note: OpenBLAS not installed (Debian: apt-get install libopenblas0-pthread); using candle's matmul, 1.3-1.4x slower" >&2
exit 0
