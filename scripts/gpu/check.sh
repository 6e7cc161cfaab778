#!/usr/bin/env bash
# The GPU check: every GPU path of the project, time-boxed, in one run of about 9 minutes.
#
# Run on the GPU machine from the repository root, after `scripts/gpu/prepare.sh` (here, with
# network) put the wheels it lacks into .gpu-wheels/ and they travelled with the tree:
#
#   bash scripts/gpu/check.sh                     # every step, in order of value
#   bash scripts/gpu/check.sh --only train_sdpa,generate   # rerun some steps
#   bash scripts/gpu/check.sh --dry-run           # the plan; checks every script is there
#
# Environment: PYTHON (python3), OUT, WHEELS (.gpu-wheels), SHAPE and SMALL (the benches'
# models: shape:qwen2.5-0.5b and shape:smollm2-135m, real sizes with random weights), BOXES
# (on; off runs every step to its end, as the kit's own test on a CPU does, so that a busy
# machine cannot make it fail).
# Writes into $OUT (else ./gpu-check): log.txt (everything, untruncated), check.md (one table
# of every figure, with the GPU's name and the torch and CUDA versions), figures.json (every
# step's report) and steps.tsv, four files and nothing else; the steps' own outputs stay in
# $WORK (a temp folder). A step that runs past its time box is stopped and the next
# one starts, so a slow step cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/../.."

ONLY="" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $1; see --help" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check}
WORK=${WORK:-${TMPDIR:-/tmp}/gpu-check-work}  # step reports and the fit's run dir: not in $OUT
SHAPE=${SHAPE:-shape:qwen2.5-0.5b}   # the training and sampling benches' model
SMALL=${SMALL:-shape:smollm2-135m}   # the evaluation benches' model
WHEELS=${WHEELS:-.gpu-wheels}
BOXES=${BOXES:-on}
TRAIN="scripts/bench/bench_train.py --model $SHAPE --seq_len 512 --batch_size 8 --warmup 3 --steps 10 --repeats 1"
FIT_FLAGS="--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed --trainer.max_epochs 2 --trainer.enable_progress_bar false --overwrite true"

# name | seconds | command (in order of value; {W} is the step's report folder)
STEPS=(
  "gpu_tier|140|$PY -m pytest tests/test_gpu.py -rs -p no:cacheprovider --timeout 130 --junitxml {W}/gpu_tier.xml"
  "train_sdpa|90|$PY $TRAIN --finite_check_cost --json {W}/train_sdpa.json"
  "train_compile|80|$PY $TRAIN --compile --json {W}/train_compile.json"
  "train_fsdp|60|$PY $TRAIN --strategy fsdp --json {W}/train_fsdp.json"
  "generate|70|$PY scripts/bench/bench_generate.py --model $SHAPE --batch_size 64 --max_new_tokens 128 --host_every 1 8 --cuda_graph --json {W}/generate.json"
  "fit_debug|50|$PY -m selftrain fit --config configs/debug.yaml $FIT_FLAGS --trainer.default_root_dir {W}/fit"
  "eval_generation|40|$PY scripts/bench/bench_eval_generation.py --model $SMALL --requests 32 --batch_size 16 --rounds 1 --json {W}/eval_generation.json"
  "probes_one_pass|30|$PY scripts/bench/bench_probes_one_pass.py --model $SMALL --rows 256 --batch_size 64 --json {W}/probes_one_pass.json"
)

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
NAMES=$(printf '%s\n' "${STEPS[@]}" | cut -d'|' -f1 | paste -sd, -)
for name in ${ONLY//,/ }; do
  [[ ",$NAMES," == *",$name,"* ]] || { echo "check.sh: --only $name: no such step; steps: $NAMES" >&2; exit 2; }
done

if [ "$DRY" = 1 ]; then
  status=0
  declare -A parsed=()  # a script named by several steps is checked once
  total=0
  for step in "${STEPS[@]}"; do IFS='|' read -r name seconds _ <<<"$step"; wanted "$name" && total=$(( total + seconds )); done
  echo "plan (time boxes in seconds; $total s at most):"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name seconds command <<<"$step"
    wanted "$name" || continue
    echo "  $name ($seconds s): ${command//\{W\}/$WORK}"
    for word in $command; do
      case "$word" in
        scripts/*.py)
          [ -n "${parsed[$word]:-}" ] && continue
          parsed[$word]=1
          if [ ! -f "$word" ]; then echo "    missing: $word"; status=1
          elif ! $PY "$word" --help >/dev/null 2>&1; then echo "    --help fails: $word"; status=1; fi ;;
        tests/*.py|configs/*.yaml) [ -f "$word" ] || { echo "    missing: $word"; status=1; } ;;
      esac
    done
  done
  $PY scripts/gpu/kit.py summarize --help >/dev/null || status=1
  [ "$status" = 0 ] && echo "every script is there and parses"
  exit $status
fi

mkdir -p "$OUT" "$WORK"
: >"$WORK/steps.tsv"
exec > >(tee "$OUT/log.txt") 2>&1
START=$(date +%s)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-site "$WHEELS"/*.whl || { echo "installing $WHEELS failed"; exit 1; }
  export PYTHONPATH=/tmp/gpu-site:$PWD
else
  echo "no wheels in $WHEELS: using the machine's own packages"
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# every step imports these: a missing or mismatched wheel stops the check here, in seconds
$PY -c "import transformers, lightning, lm_eval, datasets, jsonargparse, selftrain.trainer_cli" \
  || { echo "the project does not import on this machine: carry the wheel named above"; exit 1; }
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
VERSIONS=$($PY -c "import torch; print(torch.__version__, torch.version.cuda)" 2>/dev/null)
echo "GPU: ${GPU:-none found}; torch and CUDA: ${VERSIONS:-torch not importable}"

for step in "${STEPS[@]}"; do
  IFS='|' read -r name seconds command <<<"$step"
  wanted "$name" || continue
  echo; echo "=== $name (time box $seconds s; $(( $(date +%s) - START )) s since the start)"
  begin=$(date +%s)
  if [ "$BOXES" = off ]; then
    ${command//\{W\}/$WORK}
  else
    timeout --kill-after=10 "$seconds" ${command//\{W\}/$WORK}
  fi
  rc=$?
  took=$(( $(date +%s) - begin ))
  case $rc in
    0) result=ok ;;
    124|137) result="stopped at its time box" ;;
    *) result="failed (exit $rc)" ;;
  esac
  echo "=== $name: $result, $took s"
  printf '%s\t%s\t%s\n' "$name" "$result" "$took" >>"$WORK/steps.tsv"
done

read -r TORCH CUDA <<<"${VERSIONS:-? ?}"
$PY scripts/gpu/kit.py summarize --work "$WORK" --out "$OUT/check.md" --gpu "${GPU:-no GPU found}" \
  --torch "$TORCH" --cuda "$CUDA"
cp "$WORK/steps.tsv" "$OUT/steps.tsv"
echo "done in $(( $(date +%s) - START )) s; the table: $OUT/check.md"
