#!/usr/bin/env bash
# The late-deciding model (visedit-late): the second teaching model tuned so that its answer keeps following
# its image tokens up to depth 7 (train-late), and what the book shows of it (chapters 2-8): its profile with
# the paper's rule for l_e, and VEAD's reduced-budget layer sweep with the settings of the second model's
# answer-memory rows (results/visedit-llava/sweep/answer-layer*.json), at the rule's layer and five more;
# then the 504-edit evaluations: the baselines retuned on this model's train split (tune grids as in
# reproduce.sh), MEND trained on it, and VEAD trained at the rule's layer with the second model's preset,
# as the paper has it and with the learned scope of the second model's scoped editor (prompt route at
# layer 8, route_min and refine_lr chosen on 100 train edits by reproduce.sh's rules). With JOBS=2 these take
# about 65 minutes: VEAD's lane (its training 35 min on one thread) beside the baselines' (57 min). Last, what
# the attribution chapters read of this model and the sweep's rows with the paper's memory (80 minutes with
# JOBS=2 beside other work: the sanity checks 26 min, each sweep row 10-25 min); then chapter 5's three variants
# at the rule's layer (25 minutes with JOBS=2); last, chapter 6's shipped VEAD through the prompt route on raw
# keys and the caption edits (E-IC: the baselines, MEND and VEAD trained on the caption split; 80 minutes with
# JOBS=2 beside other work).
#
#   JOBS=2 bash notebooks/results/late.sh    # everything missing; the sweep in two lanes of one thread each
#   DRY=1 bash notebooks/results/late.sh     # print the commands only
#   STAGE=DIR bash notebooks/results/late.sh # the results into a staging tree that mirrors the repository
#
# The model ships in visedit/models/embedded_late (its first step is then skipped); delete that folder to
# retrain it: 1200 steps on one thread, 32 minutes on a 2-core machine beside another one-thread job.
# Resumable: a result that exists is skipped. Run it alone: the machine has two cores. Tuning does not change
# the presets: when tune's best differs from presets/visedit-late, the script stops and says so.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
R=${STAGE:-.}/notebooks/results/visedit-late
W=${WORK:-.reproduce}/visedit-late
M=(--model visedit-late)
KEY=visedit-late
T=${STAGE:-.}/visedit/editing/trained/visedit-late
LLAVA=visedit/editing/presets/visedit-llava   # the second model's VEAD preset (layer: the rule's, given below)

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

baselines() {  # FT-L, FT-V and IKE retuned here (the presets in presets/visedit-late must hold tune's best), MEND
  tune_baselines '[0, 3, 6, 9, 11]'
  local e
  for e in none ft_l ft_v ike; do
    step "$R/evaluate/$e" $PY -m visedit evaluate "${M[@]}" --editor $e --json --fresh --out "$R/evaluate/$e"
  done
  step "$T/mend" $PY -m visedit train-mend "${M[@]}" --json --out "$T/mend"
  step "$R/evaluate/mend" $PY -m visedit evaluate "${M[@]}" --editor mend --weights "$T/mend" --json --fresh \
    --out "$R/evaluate/mend"
}
# scoped_runs PREFIX OUT ROUTE...: the shipped VEAD applied through the route ROUTE (--set options); its threshold
# tried on 100 train edits (scoped-tune/PREFIXroute-min*) and chosen by scoped_pick's rule for that kind, then
# the refinement's step size (PREFIXrefine-lr*), then every eval edit with both choices (evaluate/OUT)
scoped_runs() {
  local prefix=$1 out=$2 m lr chosen; shift 2
  local V=(--editor vead --preset $LLAVA/vead.yaml --weights "$T/vead")
  for m in 0.5 0.6 0.7 0.8; do
    step "$R/scoped-tune/${prefix}route-min$m" $PY -m visedit evaluate "${M[@]}" --split train --limit 100 "${V[@]}" \
      "$@" --set route_min=$m --json --fresh --out "$R/scoped-tune/${prefix}route-min$m"
  done
  chosen=$(scoped_pick "${prefix}route-min" 0.5 0.6 0.7 0.8)
  for lr in 0.05 0.2; do
    step "$R/scoped-tune/${prefix}refine-lr$lr" $PY -m visedit evaluate "${M[@]}" --split train --limit 100 "${V[@]}" \
      "$@" --set route_min="$chosen" --set refine_steps=50 --set refine_lr=$lr --json --fresh \
      --out "$R/scoped-tune/${prefix}refine-lr$lr"
  done
  step "$R/evaluate/$out" $PY -m visedit evaluate "${M[@]}" "${V[@]}" "$@" --set route_min="$chosen" \
    --set refine_steps=50 --set refine_lr="$(scoped_pick "${prefix}refine-lr" 0.05 0.2)" --json --fresh \
    --out "$R/evaluate/$out"
}
vead_at_rule() {  # VEAD at the rule's layer; the paper's editor, then through the learned scope with refinement
  local V=(--editor vead --preset $LLAVA/vead.yaml --weights "$T/vead")
  step "$T/vead" env OMP_NUM_THREADS=1 $PY -m visedit train-vead "${M[@]}" --config $LLAVA/vead.yaml --layer "$rule" \
    --json --out "$T/vead"
  step "$R/evaluate/vead" $PY -m visedit evaluate "${M[@]}" "${V[@]}" --json --fresh --out "$R/evaluate/vead"
  step "$T/scope-layer8" $PY -m visedit fit-scope "${M[@]}" --layer 8 --json --out "$T/scope-layer8"
  scoped_runs learned- vead-learned --set route=prompt --set route_layer=8 --set route_scope="$T/scope-layer8"
}
lanes vead_at_rule baselines

# What chapters 2-4 read of this model beside the contributions: its reading report (attention profile, layer
# selectivity, model card), the maps' sanity checks with the gate of the VEAD above (12 records), every heatmap
# method scored on the masks of 12 answered records, and what a free change of the visual tokens reaches at six
# layers; then the sweep's rows with the paper's memory (the edit sample) beside the answer rows above
analyses() {
  step "$R/reading.json" $PY -m visedit reading "${M[@]}" --out "$R/reading.json"
  step "$R/sanity/first.json" $PY -m visedit sanity "${M[@]}" --vead "$T/vead" --limit 12 --out "$R/sanity/first.json"
  step "$R/regions.json" $PY -m visedit regions "${M[@]}" --methods masks --limit 12 --json --out "$R/regions.json"
  step "$R/reachability.json" $PY -m visedit reachability "${M[@]}" --layers 0 3 5 7 9 11 --json \
    --out "$R/reachability.json"
  sweep_out "${lane_a[@]:0:2}"
}
paper_b() { sweep_out "${lane_a[@]:2}" "${lane_b[@]}"; }
lanes analyses paper_b
# ---- for chapter 5 -------------------------------------------------------------------------------------------
# At the rule's layer, with the same answer memory: the IM reading the edit image's visual tokens instead of the
# prompt, and two rewrites of ours beside the paper's linear map (as reproduce.sh's rows of the second model)
variants() {
  im_image_row "$rule"
  sweep_out answer token-mlp:token_mlp=192 "$rule"
}
slots() { sweep_out answer slots:slots=8 "$rule"; }
lanes variants slots
# ---- for chapter 6 ----------------------------------------------------------------------------------------
# The shipped VEAD through the prompt route alone (chapter 6's first scoped editor), by reproduce.sh's rules
scoped() { scoped_runs "" vead-scoped --set route=prompt --set route_layer=8; }
# E-IC, the caption edits (steps.sh: the baselines and MEND), and VEAD trained on the caption split at the rule's layer
caption_vead() {
  step "$T/vead-caption" env OMP_NUM_THREADS=1 $PY -m visedit train-vead "${M[@]}" --config $LLAVA/vead.yaml \
    --layer "$rule" --task caption --json --out "$T/vead-caption"
  step "$R/evaluate-caption/vead" $PY -m visedit evaluate "${M[@]}" --task caption --editor vead \
    --preset $LLAVA/vead.yaml --weights "$T/vead-caption" --json --fresh --out "$R/evaluate-caption/vead"
}
scoped_and_captions() { scoped; caption_baselines; caption_mend; }
lanes scoped_and_captions caption_vead
echo "all results are in place under $R"
