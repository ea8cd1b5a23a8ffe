#!/usr/bin/env bash
# Recompute every committed result of the book that depends on a teaching model, in dependency order:
# the tuned baseline settings, the shipped MEND and VEAD weights, the six 504-edit evaluations, the
# sanity checks of the maps, the VEAD ablations and the layer sweep; on the second model also the E-IC
# (caption) evaluations and the many-edits runs. About 5 hours on 2 CPU threads for
# the first model (times per step below).
#
#   bash notebooks/results/reproduce.sh                 # on the first embedded model, into the repository
#   MODEL=visedit-llava bash notebooks/results/reproduce.sh
#                                                       # on the second: results/visedit-llava/, its
#                                                       # presets/ and trained/ folders, l_e by the rule
#   MODEL=visedit-blip2 bash notebooks/results/reproduce.sh
#                                                       # on the BLIP-2 teaching model: the same, up to the
#                                                       # 504-edit evaluations (its query tokens have no grid)
#   MODEL=visedit-late bash notebooks/results/reproduce.sh
#                                                       # on the second model tuned to decide late: its own
#                                                       # script, late.sh (the tuning, then every result of
#                                                       # it that the book shows)
#   MODEL=DIR STAGE=DIR bash notebooks/results/reproduce.sh
#                                                       # on another tiny model (e.g. a retrained one),
#                                                       # into a staging tree that mirrors the repository
#   DRY=1 bash notebooks/results/reproduce.sh           # print the commands only
#   JOBS=2 bash notebooks/results/reproduce.sh          # sweep and ablations in two lanes of one thread each
#
# JOBS=2: on a 2-core machine two one-thread VEAD trainings run side by side as fast as one two-thread
# training each (0.73 s/step against 0.72), so the sweep and the ablations take half the time. The thread
# count changes results in the last bits: the committed sweep rows and ablations were computed with JOBS=2,
# except vead-no-hard-loc (the shipped preset before hard_loc, trained on two threads); the shipped VEAD
# trains on one thread (no slower than on two); everything else ran on two threads. Each VEAD card
# records its thread count.
# Resumable: a step whose output exists is skipped (delete it to redo it), and the long trainings
# resume from their own checkpoints. Trainings and reports write atomically, so an interrupted one leaves
# nothing half-written under its final name; an evaluation writes its summary.json last, and one cut off
# before it is resumed where it stopped (steps.sh). Run it alone: the machine has two cores.
# Tuning does not change the presets: when a tune step's best setting differs from its preset, the
# script stops and says so; edit the preset (visedit/editing/presets/) and run it again.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ ${MODEL:-} == visedit-late ]]; then exec bash notebooks/results/late.sh; fi
PY=${PY:-.venv/bin/python}
STAGE=${STAGE:-.}
R=$STAGE/notebooks/results
T=$STAGE/visedit/editing/trained
W=${WORK:-$STAGE/.reproduce}          # intermediate weights of ablations and sweeps (not committed)
M=()
L=()
KEY=                                   # an embedded model with its own results, presets and trained editors
FTL_LAYERS='[0, 2, 4, 6, 7]'           # FT-L's layer grid: spread over the decoder, the last included
if [[ ${MODEL:-} == visedit-llava || ${MODEL:-} == visedit-blip2 ]]; then
  KEY=$MODEL
  M=(--model "$MODEL")
  R=$R/$KEY
  T=$T/$KEY
  W=$W/$KEY
  FTL_LAYERS='[0, 3, 6, 9, 11]'
elif [[ -n "${MODEL:-}" ]]; then
  M=(--model "$MODEL")
  L=(--layer 0)                        # the preset's l_e (another --model would choose it from its profile)
fi

source notebooks/results/steps.sh

# ---- baseline settings, chosen on 40 train edits (a few minutes each) ---------------------------------
tune_baselines "$FTL_LAYERS"

# ---- the 504-edit evaluations (2–3 min each) of the baselines, MEND (trained in 6 min) and VEAD (47 min)
for e in none ft_l ft_v ike; do
  step "$R/evaluate/$e" $PY -m visedit evaluate "${M[@]}" --editor $e --json --fresh --out "$R/evaluate/$e"
done
for e in mend vead; do
  [[ $e == mend ]] && step "$T/mend" $PY -m visedit train-mend "${M[@]}" --json --out "$T/mend"
  [[ $e == vead ]] && step "$T/vead" env OMP_NUM_THREADS=1 $PY -m visedit train-vead "${M[@]}" "${L[@]}" --json \
    --out "$T/vead"
  step "$R/evaluate/$e" $PY -m visedit evaluate "${M[@]}" --editor $e --weights "$T/$e" --json --fresh \
    --out "$R/evaluate/$e"
done

if [[ $KEY == visedit-blip2 ]]; then  # the maps' sanity checks and the sweeps need a patch grid
  echo "all results are in place under $R"
  exit 0
fi

# ---- sanity checks of every heatmap method and the shipped VEAD's gate (12 records, 7 min), chapter 4 -------
step "$R/sanity/first.json" $PY -m visedit sanity "${M[@]}" --vead "$T/vead" --limit 12 --out "$R/sanity/first.json"
if [[ $KEY == visedit-llava ]]; then  # every heatmap method on the masks of 12 answered records (9 min), chapter 4
  step "$R/regions.json" $PY -m visedit regions "${M[@]}" --methods masks --limit 12 --json --out "$R/regions.json"
fi

# ---- many edits: T edits of the eval split in one seeded order, applied without restoring; the first
# T/10 edits are scored again after every T/10 (retention). VEAD as the paper has it holds the last edit;
# with a memory it holds every edit and routes each input to the nearest image (vead-memory) or to the
# nearest image and question (vead-joint)
# The late route (vead-late) reads both keys at the last layer and leaves an input unedited when its best
# score, as a mean cosine, is below route_min: the smallest of 0.7, 0.8, 0.9 whose M-locality on the
# unrelated probes reaches 0.90 after 100 edits of the *train* split (the eval split never chooses it).
# The scoped memory (vead-scoped, the second model) is the prompt route with refined edits, its threshold
# chosen by the same rule; the learned memory (vead-learned) the same through the learned scope
LATE=(--set memory=true --set route=joint --set route_layer=-1)
route_tune() {  # route_tune NAME [layerL]: tune the route_min of NAME (vead-late or vead-scoped) for the shipped
  # adapter (or the one trained at layer L)
  local name=$1 sfx=${2:+-$2} weights=vead${2:+-$2} args=("${LATE[@]}")
  [[ $name == vead-scoped ]] && args=(--set memory=true "${SCOPE[@]}" "${REFINE[@]}")
  [[ $name == vead-learned ]] && args=(--set memory=true "${LEARNED[@]}" "${LEARNED_REFINE[@]}")
  for m in 0.7 0.8 0.9; do
    step "$R/sequential-tune/$name$sfx-min$m-T100" $PY -m visedit evaluate "${M[@]}" --split train --editor vead \
      --weights "$T/$weights" --sequential 100 --every 10 "${args[@]}" --set route_min=$m --json --fresh \
      --out "$R/sequential-tune/$name$sfx-min$m-T100"
  done
}
tuned_min() {  # tuned_min NAME [layerL]: NAME's tuned route_min (DRY: a placeholder)
  if [[ -n "${DRY:-}" ]]; then echo TUNED; return; fi
  $PY - "$R/sequential-tune" "$1${2:+-$2}" <<'PY'
import json, sys
from pathlib import Path
for m in ("0.7", "0.8", "0.9"):
    s = json.loads((Path(sys.argv[1]) / f"{sys.argv[2]}-min{m}-T100" / "summary.json").read_text())
    if s["unrelated"]["m_locality"]["token"] >= 0.90:
        print(m)
        break
else:
    print("0.9")
PY
}
many() {  # many EDITOR-TAG: every T for one editor
  local tag=$1 editor=${1%%-*} extra=() layer=
  [[ $tag == *-layer* ]] && layer=${tag##*-}  # vead-memory-layerL: the adapter trained at layer L
  [[ $tag == vead-memory* ]] && extra=(--set memory=true --set route=nearest)
  [[ $tag == vead-joint ]] && extra=(--set memory=true --set route=joint)
  [[ $tag == vead-late* ]] && extra=("${LATE[@]}" --set route_min="$(tuned_min vead-late $layer)")  # for that adapter
  [[ $tag == vead-scoped* ]] && extra=(--set memory=true "${SCOPE[@]}" "${REFINE[@]}" \
    --set route_min="$(tuned_min vead-scoped $layer)")
  [[ $tag == vead-learned* ]] && extra=(--set memory=true "${LEARNED[@]}" "${LEARNED_REFINE[@]}" \
    --set route_min="$(tuned_min vead-learned $layer)")
  local weights=$editor${layer:+-$layer}
  [[ $editor == mend || $editor == vead ]] && extra+=(--weights "$T/$weights")
  for n in 1 10 100 500; do
    local every=(); (( n >= 10 )) && every=(--every $((n / 10)))
    step "$R/sequential/$tag-T$n" $PY -m visedit evaluate "${M[@]}" --editor "$editor" --sequential $n \
      "${every[@]}" "${extra[@]}" --json --fresh --out "$R/sequential/$tag-T$n"
  done
}
many_a() { many vead-memory; many vead-joint; route_tune vead-late; many vead-late; many vead; many ike; }
many_b() { many ft_l; many mend; }

# ---- the second model: VEAD where the paper puts it, swept over the decoder (its ablations are sweep rows) ---
if [[ $KEY == visedit-llava ]]; then
  # the rule's l_e is the shipped VEAD's layer (before it is trained: the rule's choice in the committed
  # contributions of the study); the sweep adds it to six layers spread over the twelve
  rule=$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["config"]["layer"])' "$T/vead/vead.json" \
    2>/dev/null || $PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["choose_edit_layer"])' \
    "$STAGE/notebooks/results/study/llava-contributions.json" 2>/dev/null || echo 0)
  lane_a=(0 4 8)
  [[ " 0 2 4 6 8 10 " == *" $rule "* ]] || lane_a+=("$rule")
  sweep_a() { sweep_out "${lane_a[@]}"; }
  sweep_b() { sweep_out 2 6 10; }
  lanes sweep_a sweep_b
  # the same rows with VEAD's memory reading the new answer's token embeddings (memory_reads: answer, ours)
  answer_a() { sweep_out answer "${lane_a[@]}"; }
  answer_b() { sweep_out answer 2 6 10; }
  lanes answer_a answer_b
  # at the rule's layer, the IM reading the edit image's visual tokens instead of the prompt (ours, the option
  # the first model's preset uses), with the same answer memory
  im_image_row "$rule"
  # at the rule's layer, two rewrites of ours beside the paper's linear map, with the same answer memory: each
  # visual token's rewrite an MLP of the token and what it read (token_mlp), or its own mix of 8 directions (slots)
  sweep_out answer token-mlp:token_mlp=192 "$rule"
  sweep_out answer slots:slots=8 "$rule"
  # what a visual-token editor could do at each of six layers: a free change of the visual tokens, optimised
  # per edit (8 edits, 200 Adam steps at lr 0.2; 60 steps at lr 0.05 reached layer 7's new answers on 7 of
  # 16 edits, these settings on all 8)
  step "$R/reachability.json" $PY -m visedit reachability "${M[@]}" --layers 0 3 5 7 9 11 --json \
    --out "$R/reachability.json"
  # VEAD at the full budget on the layer where the answer-memory sweep edits best, beside the rule's (the
  # shipped VEAD), with the same preset: trained in 73 min on one thread, evaluated on the 504 eval edits
  best=$($PY - "$R/sweep" <<'PY'
import json, sys
from pathlib import Path
rows = [json.loads(p.read_text()) for p in Path(sys.argv[1]).glob("answer-layer*.json")]
print(max(rows, key=lambda r: r["mean"])["layer"] if rows else "")
PY
)
  if [[ -z $best ]]; then
    [[ -n "${DRY:-}" ]] || { echo "no answer-memory sweep rows in $R/sweep" >&2; exit 1; }
    best=BEST
  fi
  step "$T/vead-layer$best" env OMP_NUM_THREADS=1 $PY -m visedit train-vead "${M[@]}" --layer "$best" --json \
    --out "$T/vead-layer$best"
  step "$R/evaluate/vead-layer$best" $PY -m visedit evaluate "${M[@]}" --editor vead --weights "$T/vead-layer$best" \
    --json --fresh --out "$R/evaluate/vead-layer$best"
  # The same adapter scoped and refined (ours; settings of how an edit is applied, not trained): the prompt
  # route applies an edit only to inputs whose last prompt token's state at the output of layer 8 (the first
  # of the block whose attention contributes most) has a cosine >= route_min with the edit prompt's; each
  # edit's memory rows are then fitted to its own sample (refine_steps). Chosen on 100 *train* edits:
  # route_min, the smallest of 0.5-0.8 whose M-locality and in-image locality both reach 0.95;
  # refine_lr, the better five-metric mean of 0.05 and 0.2 (50 steps)
  SCOPE=(--set route=prompt --set route_layer=8)
  for m in 0.5 0.6 0.7 0.8; do
    step "$R/scoped-tune/route-min$m" $PY -m visedit evaluate "${M[@]}" --split train --limit 100 --editor vead \
      --weights "$T/vead-layer$best" "${SCOPE[@]}" --set route_min=$m --json --fresh --out "$R/scoped-tune/route-min$m"
  done
  scoped_min=$(scoped_pick route-min 0.5 0.6 0.7 0.8)
  for lr in 0.05 0.2; do
    step "$R/scoped-tune/refine-lr$lr" $PY -m visedit evaluate "${M[@]}" --split train --limit 100 --editor vead \
      --weights "$T/vead-layer$best" "${SCOPE[@]}" --set route_min="$scoped_min" --set refine_steps=50 \
      --set refine_lr=$lr --json --fresh --out "$R/scoped-tune/refine-lr$lr"
  done
  REFINE=(--set refine_steps=50 --set refine_lr="$(scoped_pick refine-lr 0.05 0.2)")
  SCOPED=("${SCOPE[@]}" --set route_min="$scoped_min" "${REFINE[@]}")
  step "$R/evaluate/vead-scoped-layer$best" $PY -m visedit evaluate "${M[@]}" --editor vead \
    --weights "$T/vead-layer$best" "${SCOPED[@]}" --json --fresh --out "$R/evaluate/vead-scoped-layer$best"
  # The same route through a learned scope (ours): a linear map of the centred layer-8 keys, fitted on the
  # train split's probes after the first 100 edits (2.7 min on two threads); route_min, the value of 0.5-0.8
  # with the best mean of all seven probes on the same 100 train edits; refine_lr by the rule above
  step "$T/scope-layer8" $PY -m visedit fit-scope "${M[@]}" --layer 8 --json --out "$T/scope-layer8"
  LEARNED=("${SCOPE[@]}" --set route_scope="$T/scope-layer8")
  for m in 0.5 0.6 0.7 0.8; do
    step "$R/scoped-tune/learned-route-min$m" $PY -m visedit evaluate "${M[@]}" --split train --limit 100 \
      --editor vead --weights "$T/vead-layer$best" "${LEARNED[@]}" --set route_min=$m --json --fresh \
      --out "$R/scoped-tune/learned-route-min$m"
  done
  learned_min=$(scoped_pick learned-route-min 0.5 0.6 0.7 0.8)
  for lr in 0.05 0.2; do
    step "$R/scoped-tune/learned-refine-lr$lr" $PY -m visedit evaluate "${M[@]}" --split train --limit 100 \
      --editor vead --weights "$T/vead-layer$best" "${LEARNED[@]}" --set route_min="$learned_min" \
      --set refine_steps=50 --set refine_lr=$lr --json --fresh --out "$R/scoped-tune/learned-refine-lr$lr"
  done
  LEARNED_REFINE=(--set refine_steps=50 --set refine_lr="$(scoped_pick learned-refine-lr 0.05 0.2)")
  step "$R/evaluate/vead-learned-layer$best" $PY -m visedit evaluate "${M[@]}" --editor vead \
    --weights "$T/vead-layer$best" "${LEARNED[@]}" --set route_min="$learned_min" "${LEARNED_REFINE[@]}" \
    --json --fresh --out "$R/evaluate/vead-learned-layer$best"
  # ---- E-IC, the caption edits (186 eval edits; the first model's words cannot say a caption): the
  # baselines with their E-VQA settings; MEND and VEAD trained on the caption train split, as the paper
  # trains one editor per dataset
  caption_baselines
  caption_b() {
    step "$T/vead-caption" $PY -m visedit train-vead "${M[@]}" --task caption --json --out "$T/vead-caption"
    step "$R/evaluate-caption/vead" $PY -m visedit evaluate "${M[@]}" --task caption --editor vead \
      --weights "$T/vead-caption" --json --fresh --out "$R/evaluate-caption/vead"
  }
  lanes caption_mend caption_b
  lanes many_a many_b
  many "vead-memory-layer$best"  # the memory on the adapter at the sweep's best layer
  route_tune vead-late "layer$best"; many "vead-late-layer$best"  # the late route on it, its threshold tuned for it
  route_tune vead-scoped "layer$best"; many "vead-scoped-layer$best"  # the prompt route, each edit refined
  route_tune vead-learned "layer$best"; many "vead-learned-layer$best"  # the same through the learned scope
  echo "all results are in place under $R"
  exit 0
fi

# ---- the layer sweep (5–9 min per row), chapters 5–7; files are named without the --set suffix ----------
sweep() {  # sweep ROW-TAG... -- SWEEP-OPTIONS...
  local tags=()
  while [[ $1 != -- ]]; do tags+=("$1"); shift; done; shift
  local missing=0
  for tag in "${tags[@]}"; do [[ -e $R/sweep/$tag.json ]] || missing=1; done
  if [[ $missing == 0 ]]; then echo "done    $R/sweep/{${tags[*]}}.json"; return; fi
  step "$W/sweep/${tags[-1]}-w_loc3-w_im0.1.json" $PY -m visedit sweep-vead "${M[@]}" --json --at input \
    --limit 600 --steps 1000 --eval-limit 100 --decay-share 0 --set hard_loc=0 --set w_loc=3 --set w_im=0.1 --out "$W/sweep" "$@"
  [[ -n "${DRY:-}" ]] && return
  mkdir -p "$R/sweep"
  for tag in "${tags[@]}"; do cp "$W/sweep/$tag-w_loc3-w_im0.1.json" "$R/sweep/$tag.json"; done
}
sweep_a() {
  sweep in0 in0-noim -- --layers 0 --ablate-im --im-reads prompt
  sweep in0-im-image -- --layers 0 --im-reads image
}
sweep_b() {
  sweep in1-noim in3-noim in6-noim -- --layers 1 3 6 --no-im
  sweep in0-im-image-w192 -- --layers 0 --im-reads image --width 192
}
lanes sweep_a sweep_b

# ---- VEAD ablations (32–40 min each), chapter 6 only-----------------------------------------------------
ablation() {  # ablation NAME TRAIN-OPTIONS...
  local name=$1; shift
  if [[ -e $R/ablations/$name ]]; then echo "done    $R/ablations/$name"; return; fi
  step "$W/$name" $PY -m visedit train-vead "${M[@]}" "${L[@]}" --json --out "$W/$name" "$@"
  step "$R/ablations/$name" $PY -m visedit evaluate "${M[@]}" --editor vead --weights "$W/$name" --json --fresh \
    --out "$R/ablations/$name"
  [[ -n "${DRY:-}" ]] || cp "$W/$name/vead.json" "$R/ablations/$name/vead.json"
}
ablations_a() {
  ablation vead-no-hard-loc --set hard_loc=0
  ablation vead-wloc5 --set hard_loc=0 --set w_im=0.1
  ablation vead-constant-lr --set hard_loc=0 --set w_im=0.1 --set w_loc=3 --steps 4000 --decay-share 0
}
ablations_b() {
  ablation vead-wloc3 --set hard_loc=0 --set w_im=0.1 --set w_loc=3
  ablation vead-width192 --set hard_loc=0 --set w_im=0.1 --set w_loc=3 --steps 4000 --decay-share 0 --width 192
}
lanes ablations_a ablations_b
lanes many_a many_b
echo "all results are in place under $STAGE"
