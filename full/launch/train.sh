#!/usr/bin/env bash
# Launch full.train (or full.spin, full.spo) with a published preset on 1 GPU, 8 GPUs (DDP) or 8 GPUs (DeepSpeed ZeRO-2).
#
#   full/launch/train.sh METHOD MODEL CONFIG [extra train.py flags...]
#
#   METHOD  a minipref objective: sft csft bce dpo kto spin contrast dspo spo
#   MODEL   sd15 | sdxl                      -> preset full/presets/MODEL-METHOD.json
#   CONFIG  1gpu | 8gpu_ddp | 8gpu_zero2     -> full/launch/accelerate/CONFIG.yaml
#
# Environment (all optional):
#   MODEL_NAME  hub id or local dir (default: the public SD1.5 / SDXL base checkpoint)
#   DATASET     --dataset_name: parquet file, dir of parquet files or Hub dataset (default:
#               yuvalkirstain/pickapic_v2; per-image methods may also get a binary-feedback file, e.g. from
#               `python -m full.data convert pairs-to-feedback` or `convert red-filter`)
#   OUTPUT_DIR  (default: runs/MODEL-METHOD-CONFIG)
#   PYTHON      the interpreter that runs accelerate and the trainer (default: python)
#   DRY_RUN=1   print the command instead of running it
#
# Runs from any directory: relative MODEL_NAME / DATASET / OUTPUT_DIR are relative to where it is called, and the
# repository is put on PYTHONPATH, so a checkout works without `pip install -e .`.
#
# The presets describe ONE A100-80GB (per-device batch x accumulation). On 8 GPUs the script divides the
# accumulation by 8 (rounding up) so the effective batch stays the preset's; where the preset accumulates
# fewer than 8 steps the effective batch grows, and the script says so. Extra flags win over the preset.
set -euo pipefail
# Flat host memory while reading images from Arrow: Arrow's system allocator and mmap for glibc blocks >= 64 KB
# hand freed image buffers back to the OS (docs/scaling.md); a value already in the environment wins.
export ARROW_DEFAULT_MEMORY_POOL="${ARROW_DEFAULT_MEMORY_POOL:-system}"
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-65536}"

if [[ $# -lt 3 ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
METHOD=$1 MODEL=$2 CONFIG=$3
shift 3
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python}
PRESET="$MODEL-$METHOD"
CONFIG_FILE="$ROOT/full/launch/accelerate/$CONFIG.yaml"

case "$MODEL" in
  sd15) DEFAULT_MODEL="stable-diffusion-v1-5/stable-diffusion-v1-5" ;;
  sdxl) DEFAULT_MODEL="stabilityai/stable-diffusion-xl-base-1.0" ;;
  *) echo "error: MODEL must be sd15 or sdxl, got '$MODEL'" >&2; exit 2 ;;
esac
if [[ ! -f "$CONFIG_FILE" ]]; then
  echo "error: CONFIG must be one of: $(cd "$ROOT/full/launch/accelerate" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
  exit 2
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# One Python call: the method's data kind (paired / binary / self_play / online) from the registry, the
# preset's values, and the config's process count (pyyaml comes with accelerate).
VARS=$("$PYTHON" - "$METHOD" "$PRESET" "$CONFIG_FILE" <<'PY'
import shlex, sys, yaml
from minipref import get_objective
from full.presets import load_preset
method, preset, config = sys.argv[1:]
try:
    kind, flags = get_objective(method).data, load_preset(preset)
except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
values = {"KIND": kind, "BATCH": flags["train_batch_size"], "ACCUM": flags.get("gradient_accumulation_steps", 1),
          "PRECISION": flags["mixed_precision"], "NPROC": yaml.safe_load(open(config))["num_processes"]}
print("\n".join(f"{k}={shlex.quote(str(v))}" for k, v in values.items()))
PY
)
eval "$VARS"
NEW_ACCUM=$(( (ACCUM + NPROC - 1) / NPROC ))
echo "preset $PRESET: $BATCH per device x $ACCUM accumulation = $((BATCH * ACCUM)) examples per optimizer step;" \
     "$CONFIG: $NPROC process(es) x $BATCH x $NEW_ACCUM = $((NPROC * BATCH * NEW_ACCUM))" >&2
if (( NPROC * BATCH * NEW_ACCUM != BATCH * ACCUM )); then
  echo "note: the effective batch differs from the preset's (accumulation cannot go below 1);" \
       "pass a smaller --train_batch_size to match it" >&2
fi

# Paired and per-image methods read Pick-a-Pic by default (the trainer turns pairs into per-image labels with
# the preset's --feedback_policy); online methods sample their own data.
DATA_ARGS=()
if [[ "$KIND" != online || -n "${DATASET:-}" ]]; then
  DATA_ARGS=(--dataset_name "${DATASET:-yuvalkirstain/pickapic_v2}")
fi

LAUNCH_ARGS=(--config_file "$CONFIG_FILE" --mixed_precision "$PRECISION")
[[ "$CONFIG" == *zero2* ]] && LAUNCH_ARGS+=(--gradient_accumulation_steps "$NEW_ACCUM")
# Offline methods go through full.train; SPIN and SPO have their own entry points (they sample during training).
case "$METHOD" in
  spin|spo) ENTRY=(-m "full.$METHOD" --preset "$PRESET") ;;
  *)        ENTRY=(-m full.train --method "$METHOD" --preset "$PRESET") ;;
esac
CMD=("$PYTHON" -m accelerate.commands.launch "${LAUNCH_ARGS[@]}" "${ENTRY[@]}"
     --pretrained_model_name_or_path "${MODEL_NAME:-$DEFAULT_MODEL}"
     "${DATA_ARGS[@]}"
     --gradient_accumulation_steps "$NEW_ACCUM"
     --output_dir "${OUTPUT_DIR:-runs/$PRESET-$CONFIG}"
     "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${CMD[@]}"
  echo
else
  exec "${CMD[@]}"
fi
