#!/usr/bin/env bash
# Launch full.train (or full.spin, full.spo) with a published preset on 1, 8 or 16 GPUs: DDP, ZeRO-2/3 or FSDP.
#
#   full/launch/train.sh METHOD MODEL CONFIG [extra train.py flags...]
#
#   METHOD  a minipref objective: sft csft bce dpo kto spin contrast dspo spo
#   MODEL   sd15 | sdxl            -> preset full/presets/MODEL-METHOD.json (LoRA); with --train_mode full among
#                                     the extra flags, MODEL-METHOD-full.json (the whole UNet, the papers' recipes)
#   CONFIG  1gpu | {8,16}gpu_{ddp,zero2,zero3,fsdp} -> full/launch/accelerate/CONFIG.yaml (16gpu: 2 nodes x 8)
#
# Environment (all optional):
#   MODEL_NAME  hub id or local dir (default: the public SD1.5 / SDXL base checkpoint)
#   DATASET     --dataset_name: parquet file, dir of parquet files or Hub dataset (default:
#               yuvalkirstain/pickapic_v2; per-image methods may also get a binary-feedback file, e.g. from
#               `python -m full.data convert pairs-to-feedback` or `convert red-filter`)
#   OUTPUT_DIR  (default: runs/PRESET-CONFIG, e.g. runs/sd15-dpo-full-8gpu_ddp)
#   PYTHON      the interpreter that runs accelerate and the trainer (default: python)
#   PRESET      a preset name or .json file instead of MODEL-METHOD[-full]
#   MAIN_PROCESS_IP, MACHINE_RANK (0 or 1), MAIN_PROCESS_PORT (default 29500): the 16gpu configs (2 machines);
#               run the same command on both machines
#   DRY_RUN=1   print the command instead of running it
#
# Runs from any directory: relative MODEL_NAME / DATASET / OUTPUT_DIR are relative to where it is called, and the
# repository is put on PYTHONPATH, so a checkout works without `pip install -e .`.
#
# A preset gives per-GPU values for the GPU count it states ("processes"; the LoRA presets: ONE A100-80GB). On N GPUs
# the script sets accumulation = preset GPUs x accumulation / N, rounded up (full.plan.accumulation_for), so the
# effective batch stays the preset's; where that cannot go below 1 the batch grows, and the script says so (with
# --scale_lr presets the learning rate grows with it). Extra flags win over the preset. The per-GPU memory of a
# preset on a config: python -m full.presets NAME --plan --engine ENGINE --num_processes N.
set -euo pipefail
# The allocators for reading images from Arrow, chosen in full/data/allocators.py from the measurements in
# docs/scaling.md ("Allocators"): it prints the exports; a value already in the environment wins.
eval "$("${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/../data/allocators.py")"

if [[ $# -lt 3 ]]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
METHOD=$1 MODEL=$2 CONFIG=$3
shift 3
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python}
MODE=lora USER_ACCUM=""  # from the extra flags: --train_mode full picks the -full preset; an accumulation given there
for ((i = 1; i <= $#; i++)); do  # is also what accelerate gets (its value would win over the trainer's under DeepSpeed)
  arg=${!i}; next=$((i + 1))
  if [[ "$arg" == --train_mode=full || ( "$arg" == --train_mode && "${!next:-}" == full ) ]]; then MODE=full; fi
  [[ "$arg" == --gradient_accumulation_steps=* ]] && USER_ACCUM=${arg#*=}
  [[ "$arg" == --gradient_accumulation_steps ]] && USER_ACCUM=${!next:-}
done
SUFFIX=""
[[ $MODE == full ]] && SUFFIX=-full
PRESET=${PRESET:-$MODEL-$METHOD$SUFFIX}
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
# preset's values and GPU count, and the config's processes, machines and engine (pyyaml comes with accelerate).
VARS=$("$PYTHON" - "$METHOD" "$PRESET" "$CONFIG_FILE" "$MODE" <<'PY'
import shlex, sys, yaml
from minipref import get_objective
from full.plan import accumulation_for
from full.presets import available_presets, is_full, preset_details, preset_processes
method, name, config, mode = sys.argv[1:]
try:
    if mode == "full" and not name.endswith(".json") and name not in available_presets():
        full = [p for p in available_presets() if is_full(preset_details(p))]
        raise ValueError(f"no preset {name}; the --train_mode full presets: {', '.join(full)}")
    kind, preset = get_objective(method).data, preset_details(name)
    if preset["method"] != method:
        raise ValueError(f"preset {name} is for method {preset['method']}, not {method}")
    if is_full(preset) != (mode == "full"):
        raise ValueError(f"preset {name} is for --train_mode {'full' if is_full(preset) else 'lora'}")
except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
flags, launch = {k: e["value"] for k, e in preset["flags"].items()}, yaml.safe_load(open(config))
accum, nproc, stated = flags.get("gradient_accumulation_steps", 1), launch["num_processes"], preset_processes(preset)
values = {"KIND": kind, "BATCH": flags["train_batch_size"], "ACCUM": accum, "PGPUS": stated,
          "NEW_ACCUM": accumulation_for(stated, accum, nproc), "PRECISION": flags["mixed_precision"], "NPROC": nproc,
          "MACHINES": launch.get("num_machines", 1), "ENGINE": launch["distributed_type"]}
print("\n".join(f"{k}={shlex.quote(str(v))}" for k, v in values.items()))
PY
)
eval "$VARS"
NEW_ACCUM=${USER_ACCUM:-$NEW_ACCUM}
echo "preset $PRESET (for $PGPUS GPU(s)): $BATCH per device x $ACCUM accumulation = $((PGPUS * BATCH * ACCUM))" \
     "examples per optimizer step; $CONFIG: $NPROC process(es) x $BATCH x $NEW_ACCUM = $((NPROC * BATCH * NEW_ACCUM))" >&2
if [[ -n "$USER_ACCUM" ]]; then
  (( NPROC * BATCH * NEW_ACCUM != PGPUS * BATCH * ACCUM )) &&
    echo "note: --gradient_accumulation_steps $USER_ACCUM changes the preset's effective batch" >&2
elif (( NPROC * BATCH * NEW_ACCUM != PGPUS * BATCH * ACCUM )); then
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
[[ "$ENGINE" == DEEPSPEED ]] && LAUNCH_ARGS+=(--gradient_accumulation_steps "$NEW_ACCUM")
if (( MACHINES > 1 )); then
  if [[ -z "${MAIN_PROCESS_IP:-}" || -z "${MACHINE_RANK:-}" ]]; then
    echo "error: $CONFIG runs on $MACHINES machines: set MAIN_PROCESS_IP (machine 0's address) and MACHINE_RANK" \
         "(0..$((MACHINES - 1))) and run the same command on each" >&2
    exit 2
  fi
  LAUNCH_ARGS+=(--machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_PROCESS_IP"
                --main_process_port "${MAIN_PROCESS_PORT:-29500}")
fi
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
