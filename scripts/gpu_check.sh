#!/usr/bin/env bash
# The GPU proof of issue 13, in two halves, because the GPU machine has no Rust and takes at most
# 64 MiB:
#
#   bash scripts/gpu_check.sh build     # here, no GPU needed: the CUDA build (nvcc from PyPI, code
#                                       # for sm_90), stripped, into target/gpu-carry/bin
#   bash scripts/gpu_check.sh run       # on the GPU machine: every check, one JSON line each, into
#                                       # $OUT/gpu_check.jsonl (or runs/gpu_check), then a summary
#   bash scripts/gpu_check.sh dry-run   # here: the same sequence on the CPU at toy sizes, with
#                                       # target/release's binaries, to check the script itself
#
# What travels to the GPU machine: this checkout's tracked files (scripts, bench/) and
# target/gpu-carry (the `carry` of the device tool): parity, bench_forward and bench_sae_train
# built with --features cuda, and sae-core's device tests built with --features nccl. What the run needs there and finds there: nvidia-smi, Python with
# PyTorch and HF transformers, and cuBLAS/cuRAND/NVRTC from PyTorch's wheels (put on
# LD_LIBRARY_PATH below). The binaries are linked here against stand-ins with the libraries'
# sonames (scripts/cuda_link_stubs.py), so the build needs no CUDA libraries. Models are made there
# with random weights (scripts/gpu_models.py); SAE inputs are Gaussian.
#
# The run: forward parity GPU against CPU on SmolLM2-135M's and Gemma-3-270M's shapes (f32,
# logprobs within 1e-3; bf16 reported); bench_forward; the dense encoder product's FLOP rate;
# bench_sae_train's device path at d_in 2,048, d_sae 65,536 and 262,144, batch 4,096, TopK and
# ReLU-L1, every feature dead (AuxK at every step), f32, TF32 and bf16 products, and at the first
# width TopK with no feature dead and with its pairs scattered; TopK at a million
# features in token chunks with bf16 moments; the same steps in
# PyTorch written as SAELens trains (bench/torch_sae_step.py). Each command has its own time limit, and a failure is recorded
# and the run goes on. Peak device memory is nvidia-smi's largest reading during each command.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
case "$mode" in
build)
  set -e
  source scripts/cuda_env.sh
  # Stand-ins for the CUDA libraries to link against (none run: scripts/cuda_link_stubs.py), in
  # the folder the CUDA crates already search.
  cudarc_src=$(cargo metadata --format-version 1 --all-features 2>/dev/null | "$venv/bin/python" -c 'import json,sys,os
m = json.load(sys.stdin)
print(next(os.path.join(os.path.dirname(p["manifest_path"]), "src") for p in m["packages"] if p["name"] == "cudarc"))')
  "$venv/bin/python" scripts/cuda_link_stubs.py "$cudarc_src" "$root/lib" "$root/lib/libcudart.so.13"
  target=${CUDA_TARGET:-target/cuda-release}
  cargo build --release --features cuda --target-dir "$target" \
    --example parity --example bench_forward --example bench_sae_train
  # Test binaries with their GPU tests in: sae-core's device tests (CUDA against the host path,
  # NCCL's group of one) and activation-store's GPU tests (pinned uploads and downloads).
  test_binary() { # package, test target, features
    cargo test --release --features "$3" -p "$1" --test "$2" --no-run \
      --target-dir "$target" --message-format=json 2>/dev/null \
      | T="$2" "$venv/bin/python" -c 'import json,os,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == os.environ["T"]:
        print(m["executable"])'
  }
  test_bin=$(test_binary sae-core device nccl)
  store_bin=$(test_binary activation-store gpu cuda)
  # A fresh folder: the compressed binaries of an earlier build would trip xz below.
  rm -rf target/gpu-carry/bin
  mkdir -p target/gpu-carry/bin
  for b in parity bench_forward bench_sae_train; do
    strip -o "target/gpu-carry/bin/$b" "$target/release/examples/$b"
  done
  strip -o target/gpu-carry/bin/sae_core_device_tests "$test_bin"
  strip -o target/gpu-carry/bin/activation_store_gpu_tests "$store_bin"
  # Each binary holds candle's kernels (about 55 MB stripped); xz makes it about 7 MB, so the five
  # fit in what travels (64 MiB). The run unpacks them there.
  xz -T0 -9 -f target/gpu-carry/bin/*
  du -sh target/gpu-carry
  exit 0 ;;
run) dev=cuda; bin=""; out=${OUT:-runs/gpu_check}
  d_in=2048; widths="65536 262144"; batch=4096; steps=5; py=${PYTHON:-python3}
  big=1048576; chunk=512 ;;
dry-run) dev=cpu; bin=target/release/examples; out=${OUT:-runs/gpu_check_dry}
  d_in=64; widths="512 1024"; batch=128; steps=2; py=${PYTHON:-.venv/bin/python}
  big=8192; chunk=32 ;;
*) echo "usage: $0 build|run|dry-run" >&2; exit 2 ;;
esac

mkdir -p "$out"
log="$out/gpu_check.jsonl"
: > "$log"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ "$dev" = cuda ]; then
  # The carried binaries, unpacked (Python's lzma: no xz needed there).
  bin=$work/bin; mkdir -p "$bin"
  for f in target/gpu-carry/bin/*.xz; do
    b=$bin/$(basename "$f" .xz)
    "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$b"
    chmod +x "$b"
  done
  # PyTorch's CUDA libraries and the toolkit's, for the binaries' needed libraries.
  libs=$("$py" - <<'PY'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = [d for r in roots for d in glob.glob(os.path.join(r, "*", "lib")) + glob.glob(os.path.join(r, "*", "*", "lib"))]
try:
    import torch
    dirs.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
except ImportError:
    pass
print(":".join(dirs))
PY
)
  # The binaries need CUDA 13's sonames (they were linked against them, scripts/cuda_link_stubs.py).
  # Where PyTorch's wheels carry another major version of a library, its file stands in under the
  # expected name, and the machine line below says so.
  mkdir -p "$work/lib"
  nvcc_lib=$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")
  libs="$libs:$nvcc_lib/lib64:$nvcc_lib/lib"
  stand_ins=""
  for want in libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcudart.so.13 libcurand.so.10 libnccl.so.2; do
    found=""; other=""
    for d in ${libs//:/ }; do
      [ -e "$d/$want" ] && found=1 && break
      [ -z "$other" ] && other=$(ls "$d/${want%.so.*}.so."[0-9]* 2>/dev/null | head -1)
    done
    if [ -z "$found" ] && [ -n "$other" ]; then
      ln -sf "$other" "$work/lib/$want"; stand_ins="$stand_ins $want=$(basename "$other")"
    fi
  done
  export LD_LIBRARY_PATH="$work/lib:$libs:${LD_LIBRARY_PATH:-}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    | STAND_INS="$stand_ins" "$py" -c 'import json,os,sys; n,d,m=[s.strip() for s in sys.stdin.read().split(",")[:3]]; print(json.dumps({"check":"machine","gpu":n,"driver":d,"memory":m,"library_stand_ins":os.environ["STAND_INS"].split()}))' >> "$log"
fi

# record NAME LIMIT_S CMD...: runs CMD, appends its JSON lines (stdout) with the peak device
# memory it used, or a failure line with the end of its stderr. Past $BUDGET_S seconds of the
# whole run (default 420, so that one call stays inside the device tool's 8 minutes with its
# start), the remaining commands are recorded as skipped instead of run.
budget=${BUDGET_S:-420}
record() {
  local name=$1 limit=$2; shift 2
  if [ "$SECONDS" -ge "$budget" ]; then
    echo "{\"name\": \"$name\", \"skipped\": \"over the run's budget of $budget s\"}" >> "$log"
    echo "== $name: skipped (budget)" >&2
    return
  fi
  [ $((SECONDS + limit)) -gt "$budget" ] && limit=$((budget - SECONDS + 30))
  local mon=""
  if [ "$dev" = cuda ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$work/mem" 2>/dev/null &
    mon=$!
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$work/stdout" 2> "$work/stderr"
  local rc=$?
  local peak=null
  if [ -n "$mon" ]; then
    kill "$mon" 2>/dev/null; wait "$mon" 2>/dev/null
    peak=$(sort -n "$work/mem" | tail -1)
    [ -n "$peak" ] || peak=null
  fi
  NAME=$name RC=$rc SECS=$((SECONDS - t0)) PEAK_MIB=$peak "$py" - "$work/stdout" "$work/stderr" >> "$log" <<'PY'
import json, os, sys
out, err = (open(p, errors="replace").read() for p in sys.argv[1:3])
rc, name = int(os.environ["RC"]), os.environ["NAME"]
peak = os.environ["PEAK_MIB"]
extra = {"name": name, "rc": rc, "wall_s": int(os.environ["SECS"]),
         "nvidia_smi_peak_mib": None if peak == "null" else int(peak)}
lines = [l for l in out.splitlines() if l.startswith("{")]
for l in lines:
    print(json.dumps({**json.loads(l), **extra}))
if rc != 0 and not lines or rc not in (0, 1):
    print(json.dumps({**extra, "failed": True, "stderr_tail": err[-1500:], "stdout_tail": out[-1500:]}))
elif not lines:
    print(json.dumps({**extra, "check": "command", "stdout_tail": out[-1500:]}))
PY
  echo "== $name: rc $rc, $((SECONDS - t0)) s" >&2
}

# sae-core's device tests: on CUDA, the device path against the host path and NCCL's group of
# one (the dry run has no such binary: `cargo test -p sae-core --test device` runs them here).
if [ "$dev" = cuda ]; then
  record "sae-core device tests" 180 "$bin/sae_core_device_tests" --test-threads 4
  record "activation-store gpu tests" 60 "$bin/activation_store_gpu_tests"
fi

# Models with random weights, of the real shapes (the dry run uses the tiny test fixtures).
if [ "$dev" = cuda ]; then
  record models 240 "$py" scripts/gpu_models.py --out "$work/models"
  smollm2="$work/models/smollm2"; gemma3="$work/models/gemma3"
else
  smollm2=transformer-hooks/tests/fixtures/tiny/llama; gemma3=transformer-hooks/tests/fixtures/tiny/gemma3
fi
for m in "$smollm2" "$gemma3"; do
  record "parity $(basename "$m") f32" 120 "$bin/parity" --model "$m" --device "$dev" --ctx 128
  record "parity $(basename "$m") bf16" 120 "$bin/parity" --model "$m" --device "$dev" --ctx 128 \
    --dtype bf16 --tolerance 100
done
record "forward smollm2 f32" 120 "$bin/bench_forward" --model "$smollm2" --device "$dev" \
  --layer 1 --batch 8 --ctx 256
record "forward smollm2 bf16" 120 "$bin/bench_forward" --model "$smollm2" --device "$dev" \
  --layer 1 --batch 8 --ctx 256 --dtype bf16

# The target size: a million features at d_in 2,048, TopK with AuxK at every step, in token
# chunks of 512, bf16 products and bf16 moments. From the memory measured on the CPU
# (docs/gpu.md): 48 GiB of state and about 9 GiB of chunk temporaries. No PyTorch run: its
# dense step would hold several [4096, 1M] f32 matrices, 16 GiB each.
record "ours topk $big bf16 chunked" 300 "$bin/bench_sae_train" --path device --arch topk \
  --device "$dev" --d-in $d_in --d-sae $big --batch $batch --steps 2 --dead-tokens 0 \
  --compute bf16 --moments bf16 --token-chunk $chunk

# Per width: the encoder product alone in f32, TF32 and bf16; TopK against PyTorch with TF32 and
# with bf16 products (and in plain f32 at the first width); ReLU-L1 in TF32, from its dense
# initialisation (`--target-l0 0`: the device step costs the same at any L0, and setting the bias
# for a target L0 takes a host pass). The most telling cases come first, in case the budget ends
# the run early.
first=1
for n in $widths; do
  common=(--device "$dev" --d-in $d_in --d-sae "$n" --batch $batch)
  record "encoder $n f32" 60 "$bin/bench_sae_train" --path encoder "${common[@]}" --steps 10
  record "encoder $n tf32" 60 "$bin/bench_sae_train" --path encoder "${common[@]}" --steps 10 --tf32
  record "encoder $n bf16" 60 "$bin/bench_sae_train" --path encoder "${common[@]}" --steps 10 --compute bf16
  precs="tf32 bf16"; [ -n "$first" ] && precs="tf32 bf16 f32"
  for prec in $precs; do
    ours=(); theirs=()
    case $prec in tf32) ours=(--tf32); theirs=(--tf32) ;; bf16) ours=(--compute bf16); theirs=(--bf16) ;; esac
    record "ours topk $n $prec" 150 "$bin/bench_sae_train" --path device --arch topk "${common[@]}" \
      --steps $steps --dead-tokens 0 "${ours[@]}"
    record "torch topk $n $prec" 150 "$py" bench/torch_sae_step.py --arch topk "${common[@]}" \
      --steps $steps --dead-tokens 0 "${theirs[@]}"
  done
  if [ -n "$first" ]; then
    # TopK's main pairs scattered row by row (the CPU's way; candle's CUDA scatter walks the
    # pairs serially, docs/gpu.md) against the dense products CUDA uses; and a step with no
    # feature dead (a window no run of 6 batches reaches), where both skip AuxK.
    record "ours topk $n tf32 pairs scattered" 150 "$bin/bench_sae_train" --path device --arch topk \
      "${common[@]}" --steps $steps --dead-tokens 0 --tf32 --pairs scatter
    # Where a step's time goes (the device synchronised after each phase).
    record "phases topk $n tf32" 150 "$bin/bench_sae_train" --path device --arch topk \
      "${common[@]}" --steps $steps --dead-tokens 0 --tf32 --phases
    record "ours topk $n tf32 none dead" 150 "$bin/bench_sae_train" --path device --arch topk \
      "${common[@]}" --steps $steps --dead-tokens 1000000000 --tf32
    record "torch topk $n tf32 none dead" 150 "$py" bench/torch_sae_step.py --arch topk \
      "${common[@]}" --steps $steps --dead-tokens 1000000000 --tf32
    # SAELens itself, where that machine has it (its dependencies, wandb, plotly and pandas among
    # them, are more than what travels).
    if "$py" -c "import sae_lens" 2>/dev/null; then
      record "saelens topk $n tf32" 150 "$py" bench/saelens_train_step.py --arch topk \
        "${common[@]}" --steps $steps --dead-tokens 0 --tf32
      record "saelens topk $n tf32 none dead" 150 "$py" bench/saelens_train_step.py --arch topk \
        "${common[@]}" --steps $steps --tf32
    else
      echo '{"name": "saelens topk", "skipped": "sae_lens is not installed on this machine"}' >> "$log"
    fi
  fi
  record "ours standard $n tf32" 150 "$bin/bench_sae_train" --path device --arch standard \
    "${common[@]}" --steps $steps --tf32 --target-l0 0
  record "torch standard $n tf32" 150 "$py" bench/torch_sae_step.py --arch standard "${common[@]}" \
    --steps $steps --tf32
  first=""
done

# BatchTopK at the first width in bf16: the threshold from each token's largest pre-activations
# taken from the pass itself (the whole batch), from an extra encoder product (one chunk of the
# whole batch: what that product costs) and in chunks of $chunk.
n=${widths%% *}
for rows in "" $batch $chunk; do
  record "ours batchtopk $n bf16${rows:+ chunk $rows}" 150 "$bin/bench_sae_train" --path device \
    --arch batchtopk --device "$dev" --d-in $d_in --d-sae "$n" --batch $batch --steps $steps \
    --dead-tokens 0 --compute bf16 ${rows:+--token-chunk $rows}
done
# And the same step as SAELens's BatchTopK takes it (the whole batch's top k·n over a dense
# [batch, d_sae] matrix), bf16 autocast.
record "torch batchtopk $n bf16" 150 "$py" bench/torch_sae_step.py --arch batchtopk --device "$dev" \
  --d-in $d_in --d-sae "$n" --batch $batch --steps $steps --dead-tokens 0 --bf16

# Last, the million features again with the weights themselves in bf16 (updates rounded
# stochastically): 8 GiB less state than the row above.
record "ours topk $big bf16 chunked bf16 weights" 300 "$bin/bench_sae_train" --path device \
  --arch topk --device "$dev" --d-in $d_in --d-sae $big --batch $batch --steps 2 --dead-tokens 0 \
  --compute bf16 --moments bf16 --weights bf16 --token-chunk $chunk

"$py" - "$log" "$dev" <<'PY' | tee "$out/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
# Dense peaks of an H100 SXM / H200 (NVIDIA's datasheets, without sparsity): FP32 67, TF32 495,
# BF16 989 TFLOP/s.
peak = {"f32": 67e12, "f32 (tf32 products)": 495e12, "f32 (bf16 products)": 989e12}
for r in rows:
    if r.get("skipped"):
        print(f"SKIPPED {r['name']}: {r['skipped']}")
    elif r.get("failed"):
        print(f"FAILED {r['name']} (rc {r['rc']}): {r['stderr_tail'][-300:]!r}")
    elif r.get("check") == "command":
        print(f"{r['name']}: rc {r['rc']}, {r['stdout_tail'].strip().splitlines()[-1:]}")
    elif r.get("check") == "forward_parity":
        print(f"{r['name']}: max |Δ logprob| {r['max_abs_diff']:.2e} "
              f"({'pass' if r['pass'] else 'FAIL'} at {r['tolerance']})")
    elif r.get("bench", "").startswith("forward"):
        print(f"{r['name']} {r['bench']}: {r['tokens_per_s']:.0f} tokens/s")
    elif r.get("bench") == "sae_train_step":
        mfu = ""
        if sys.argv[2] == "cuda" and r.get("dtype") in peak:
            mfu = f", {100 * r['gflops'] * 1e9 / peak[r['dtype']]:.1f}% of the {r['dtype']} peak"
        mem = r.get("nvidia_smi_peak_mib")
        print(f"{r['name']}: {r['tokens_per_s']:.0f} tokens/s, {r['gflops']:.0f} GFLOP/s{mfu}"
              + (f", peak {mem} MiB" if mem is not None else "")
              + (", candle's ops instead of ours (NVRTC failed)" if r.get("own_kernels") is False else ""))
        phases = r.get("phase_seconds_per_step") or {}
        for phase, secs in sorted(phases.items(), key=lambda p: -p[1]):
            print(f"    {phase}: {1000 * secs:.2f} ms a step")
by = {r["name"]: r for r in rows if r.get("bench") == "sae_train_step"}
for name, r in by.items():
    if name.startswith("ours "):
        for other in ("torch", "saelens"):
            t = by.get(f"{other} " + name[5:])
            if t:
                print(f"ratio ours/{other} {name[5:]}: {r['tokens_per_s'] / t['tokens_per_s']:.2f}x")
PY
echo "results: $log" >&2
