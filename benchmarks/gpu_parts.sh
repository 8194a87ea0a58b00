#!/usr/bin/env bash
# The gpu-8b suite in parts that each fit a 10-minute device call (docs/performance.md).
#
#   bash benchmarks/gpu_parts.sh PART [OUT_DIR]      # PART: 1..10 or all; OUT_DIR default: $OUT or .
#
# Each part prints its table and writes OUT_DIR/partN.json (rewritten as it goes, so a part
# cut short keeps what it measured). About 30 s of compilation per method on an H100.
#   1  step time: lora-r16 birg rankwise (+ lora-r4, their equal active rank)
#   2  step time: moelora sparsedoctor moe-vanilla (+ lora-r16)
#   3  step time: lora-r16 medmoe multilora (+ lora-r68, lora-r8: their equal active ranks at 8B)
#   4  step time: lora-r16 dora-r24 full (+ lora-r24); full fine-tuning may print "out of memory"
#   5  step time with gradient checkpointing: lora-r16 birg
#   6  evaluation throughput, with eval.compile_decode
#   7  pipeline vs plain Trainer + peft
#   8  the adapter-library routers: evaluation q/s and step time (benchmarks/library_cost.py)
#   9  1 vs all GPUs (benchmarks/parallel.py): tokens/s of lora-r16 birg moelora, and full
#      under FSDP2 with its peak memory per GPU
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:?usage: gpu_parts.sh PART [OUT_DIR]}"
out="${2:-${OUT:-.}}"
mkdir -p "$out"
export TQDM_DISABLE=1
step() { python benchmarks/step_time.py --config gpu-8b --rounds 1 "$@"; }
run_part() {
  case "$1" in
    1) step --methods lora-r16 birg rankwise --json "$out/part1.json" ;;
    2) step --methods moelora sparsedoctor moe-vanilla --json "$out/part2.json" ;;
    3) step --methods lora-r16 medmoe multilora --json "$out/part3.json" ;;
    4) step --methods lora-r16 dora-r24 full --json "$out/part4.json" ;;
    5) step --methods lora-r16 birg --gradient-checkpointing --json "$out/part5.json" ;;
    6) python benchmarks/run.py --config gpu-8b --skip-steps --skip-pipeline --compile-decode --json "$out/part6.json" ;;
    7) python benchmarks/run.py --config gpu-8b --skip-steps --skip-eval --json "$out/part7.json" ;;
    8) python benchmarks/library_cost.py --config gpu-8b | tee "$out/part8.md" ;;
    9) n="$(python -c 'import torch; print(torch.cuda.device_count())')"
       procs=1; [ "$n" -gt 1 ] && procs="1 $n"
       python benchmarks/parallel.py --config gpu-8b --methods lora-r16 birg moelora --processes $procs \
         --json "$out/part9.json" | tee "$out/part9.md"
       python benchmarks/parallel.py --config gpu-8b --methods full --fsdp --processes "$n" \
         --json "$out/part9-fsdp.json" | tee -a "$out/part9.md" ;;
    10) python benchmarks/protocols.py --config gpu-8b --json "$out/part10.json" | tee "$out/part10.md" ;;
    *) echo "unknown part: $1 (1..10 or all)" >&2; exit 2 ;;
  esac
}
if [ "$part" = all ]; then
  for p in 1 2 3 4 5 6 7 8 9 10; do run_part "$p"; done
else
  run_part "$part"
fi
