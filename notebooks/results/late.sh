#!/usr/bin/env bash
# The late-deciding model (visedit-late): the second teaching model tuned so that its answer keeps following
# its image tokens up to depth 7 (train-late), and what chapter 8 shows of it: its contribution profile with
# the paper's rule for l_e, and VEAD's reduced-budget layer sweep with the settings of the second model's
# answer-memory rows (results/visedit-llava/sweep/answer-layer*.json), at the rule's layer and five more.
#
#   JOBS=2 bash notebooks/results/late.sh    # everything missing; the sweep in two lanes of one thread each
#   DRY=1 bash notebooks/results/late.sh     # print the commands only
#   STAGE=DIR bash notebooks/results/late.sh # the results into a staging tree that mirrors the repository
#
# The model ships in visedit/models/embedded_late (its first step is then skipped); delete that folder to
# retrain it: 1200 steps on one thread, 32 minutes on a 2-core machine beside another one-thread job.
# Resumable: a result that exists is skipped. Run it alone: the machine has two cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
R=${STAGE:-.}/notebooks/results/visedit-late
W=${WORK:-.reproduce}/visedit-late
M=(--model visedit-late)

source notebooks/results/steps.sh

step visedit/models/embedded_late env OMP_NUM_THREADS=1 $PY -m visedit train-late --model visedit-llava \
  --out visedit/models/embedded_late
step "$R/contributions.json" $PY -m visedit contributions "${M[@]}" --json --limit 96 --spread --ig-limit 8 \
  --out "$R/contributions.json"
rule=$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["choose_edit_layer"])' "$R/contributions.json" \
  2>/dev/null || echo 7)

lane_a=("$rule")
lane_b=()
for layer in 0 2 4 6 10; do  # the rule's layer and five more spread over the twelve, in lanes of similar length
  [[ $layer == "$rule" ]] && continue
  if [[ $layer == 10 || $layer == 4 || $layer == 6 ]]; then lane_b+=("$layer"); else lane_a+=("$layer"); fi
done
sweep_a() { sweep_out answer "${lane_a[@]}"; }  # the settings of the second model's answer rows
sweep_b() { sweep_out answer "${lane_b[@]}"; }
lanes sweep_a sweep_b
echo "all results are in place under $R"
