#!/usr/bin/env bash
# The generator's GPU measurements (issue 4) in few device calls.
#
# Here:              make device-kit        # diffusers wheels, which the GPU image lacks
# On the device:     run(command="bash scripts/bench-gpu.sh eager", carry=[".whl"])
#                    then, in this order of priority, compile, fast25, fast25b, autotune,
#                    autotune25, train: each part fits one 10-minute call. Make the calls
#                    back to back: the machine stays warm 30 s, and with it inductor's cache.
# Locally, on CPU:   PYTHON=.venv/bin/python BENCH_SMOKE=1 bash scripts/bench-gpu.sh eager
#
# Every measurement is one `cxrsynth bench generate --json` line appended to
# $OUT/bench.jsonl (logs beside it); the part ends with a table of all lines so far.
set -uo pipefail
parts="eager | compile | fast25 | fast25b | autotune | autotune25 | train"
part=${1:?usage: bench-gpu.sh $parts}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=${OUT:-/tmp/cxrsynth-bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/cxrsynth-inductor  # compiled graphs, reused by later parts
if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

if [ "${BENCH_SMOKE:-0}" = 1 ]; then  # the same commands, tiny: checks the script, not the GPU
    preset=micro; b=4; b2=8; long=2; short=2; limit=300
else
    preset=paper; b=64; b2=128; long=200; short=25; limit=540
fi
bench() {
    echo "== bench generate --preset $preset $*" | tee -a "$out/bench-$part.log"
    timeout "$limit" "$PYTHON" -m cxrsynth.cli bench generate --json --preset "$preset" "$@" \
        2>>"$out/bench-$part.log" | tee -a "$out/bench.jsonl"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv | tee -a "$out/gpu.txt"
case "$part" in
    eager)  # DESIGN.md's anchors: eager bf16 NCHW 1.35 images/s at 200 steps (17% MFU)
        "$PYTHON" -m cxrsynth.cli bench roofline --preset "$preset" --batch "$b" --ops 12 | tee "$out/roofline.txt"
        bench --batch "$b" --steps "$long" --no-channels-last
        bench --batch "$b" --steps "$long" --profile 25
        bench --batch "$b" --steps "$long" --deterministic     # generate's cuDNN setting
        bench --batch "$b" --steps "$long" --dtype bf16-weights --profile 25
        bench --batch "$b" --steps "$short" --sampler dpmpp
        ;;
    compile)  # DESIGN.md: channels_last + default compile 2.5 images/s (32%)
        bench --batch "$b" --steps "$long" --compile --profile 25
        bench --batch "$b" --steps "$long" --compile --compile-mode reduce-overhead
        ;;
    fast25)  # issue 4's second target: >= 30 images/s at 256 px with a 25-step solver
        bench --batch "$b" --steps "$short" --sampler dpmpp --compile
        bench --batch "$b" --steps "$short" --sampler dpmpp --compile --deterministic
        bench --batch "$b" --steps "$short" --sampler dpmpp --compile --dtype bf16-weights
        ;;
    fast25b)
        bench --batch "$b2" --steps "$short" --sampler dpmpp --compile
        bench --batch "$b" --steps "$short" --sampler dpmpp --compile --compile-mode reduce-overhead
        ;;
    autotune)  # max-autotune benchmarks kernels per shape: its compilation takes minutes
        bench --batch "$b" --steps "$long" --compile --compile-mode max-autotune-no-cudagraphs --profile 25
        ;;
    autotune25)
        bench --batch "$b" --steps "$short" --sampler dpmpp --compile --compile-mode max-autotune
        ;;
    train)  # the training loop as `generator train` runs it (bf16 autocast, channels_last, fused AdamW)
        for tb in 16 32 64; do
            echo "== bench train --preset $preset --batch $tb" | tee -a "$out/bench-$part.log"
            timeout "$limit" "$PYTHON" -m cxrsynth.cli bench train --json --preset "$preset" --batch "$tb" \
                --steps 20 --warmup 5 2>>"$out/bench-$part.log" | tee -a "$out/train.jsonl"
        done
        ;;
    *) echo "unknown part $part ($parts)" >&2; exit 2 ;;
esac

touch "$out/bench.jsonl" "$out/train.jsonl"
"$PYTHON" - "$out/bench.jsonl" "$out/train.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
for r in (json.loads(line) for line in open(sys.argv[2]) if line.startswith("{")):
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
    print(f"train {r['preset']} batch {r['batch']}: {r['images_per_s']:.2f} images/s, "
          f"{r['achieved_tflops']:.1f} TFLOP/s, MFU {mfu}, {mem}")
print(f"{'preset':7} {'batch':>5} {'sampler':>9} {'dtype':>12} {'mode':31} {'CL':>3} {'img/s':>8} {'TFLOP/s':>8} "
      f"{'MFU':>6} {'roof e/f':>9} {'GiB':>5} {'warm-up s':>9}")
for r in rows:
    mode = (r["compile_mode"] or "eager") + (" det" if r.get("deterministic") else "")
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
    roof = f"{100 * r['roofline_mfu_eager']:.0f}/{100 * r['roofline_mfu_fused']:.0f}%"
    print(f"{r['preset']:7} {r['batch']:>5} {r['sampler'] + str(r['steps']):>9} {r['dtype']:>12} {mode:31} "
          f"{'y' if r['channels_last'] else 'n':>3} {r['images_per_s']:>8.3f} {r['achieved_tflops']:>8.1f} "
          f"{mfu:>6} {roof:>9} {mem:>5} {r['warmup_seconds']:>9.0f}")
for r in rows:
    if r.get("top_kernels"):
        print(f"top kernels, {r['sampler']}{r['steps']} batch {r['batch']} {r['compile_mode'] or 'eager'}:")
        for k in r["top_kernels"][:10]:
            print(f"  {100 * k['share']:5.1f}% {k['calls']:5d}x {k['name'][:100]}")
PY
