#!/usr/bin/env bash
# The study "when does a vision-language model read its image late?": train each recipe at the study
# budget (one ingredient changed each; ≤ 1 h on 2 CPU threads), then write one reading report per model
# (model card, attention profile, layer selectivity) to notebooks/results/study/NAME.json.
#
#   bash notebooks/results/study.sh          # everything missing, in order (each training on one thread)
#   DRY=1 bash notebooks/results/study.sh    # print the commands only
#   DEVICE=cuda bash notebooks/results/study.sh
#
# Every study run trains with PyTorch's fused attention kernel (--set attention=sdpa), as the committed ones
# were trained before the recipe's default became the faster eager kernel: one kernel across the study.
# Resumable: a report that exists is skipped (and so is the training it reads), and an interrupted training resumes from its checkpoint
# (WORK/NAME.ckpt). The trained study models stay in WORK (default .study/, not committed).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
R=notebooks/results/study
W=${WORK:-.study}
DEV=(--device "${DEVICE:-cpu}")

source notebooks/results/steps.sh

# the first teaching model as shipped
step "$R/first.json" $PY -m visedit reading --model visedit-tiny --out "$R/first.json"
# the recipe and its one-ingredient changes, at the study budget (the last two: further ingredients, a deeper
# and narrower decoder and a masked-patch encoder)
for recipe in llava joint-encoder one-creature shallow deep-narrow masked-encoder selector-last; do
  [[ -e $R/study-$recipe.json ]] || step "$W/$recipe" $PY -m visedit train-tiny --recipe "$recipe" --budget study --set attention=sdpa --out "$W/$recipe" --no-progress "${DEV[@]}"
  step "$R/study-$recipe.json" $PY -m visedit reading --model "$W/$recipe" --out "$R/study-$recipe.json"
done
# the recipe without the position term: its frozen patches lose where they are
[[ -e $R/study-no-position.json ]] || step "$W/no-position" $PY -m visedit train-tiny --recipe llava --budget study --set attention=sdpa --set position_weight=0 \
  --out "$W/no-position" --no-progress "${DEV[@]}"
step "$R/study-no-position.json" $PY -m visedit reading --model "$W/no-position" --out "$R/study-no-position.json"
# the recipe as first tried: its encoder learns from whole-scene captions only (no region or position term),
# 4 tower layers
[[ -e $R/study-no-region.json ]] || step "$W/no-region" $PY -m visedit train-tiny --recipe llava --budget study --set attention=sdpa --set region_weight=0 --set position_weight=0 \
  --set vision_layers=4 --out "$W/no-region" --no-progress "${DEV[@]}"
step "$R/study-no-region.json" $PY -m visedit reading --model "$W/no-region" --out "$R/study-no-region.json"
# optional (FULL=1): the recipe at its full budget without the position term, about five hours on one thread
if [[ -n ${FULL:-} ]]; then
  [[ -e $R/full-no-position.json ]] || step "$W/full-no-position" $PY -m visedit train-tiny --recipe llava --set position_weight=0 \
    --set attention=sdpa \
    --out "$W/full-no-position" --no-progress "${DEV[@]}"
  step "$R/full-no-position.json" $PY -m visedit reading --model "$W/full-no-position" --out "$R/full-no-position.json"
fi
# the second teaching model as shipped (the recipe at its full budget)
step "$R/llava.json" $PY -m visedit reading --model visedit-llava --out "$R/llava.json"
# its section-3 figures by the two commands that report them on their own
step "$R/llava-contributions.json" $PY -m visedit contributions --model visedit-llava --json --limit 96 --spread \
  --ig-limit 8 --out "$R/llava-contributions.json"
step "$R/llava-regions.json" $PY -m visedit regions --model visedit-llava --methods selectivity --json \
  --out "$R/llava-regions.json"
# the BLIP-2 teaching model (the same world and frozen encoder; a Q-Former of 32 queries between them): its
# maps are spread from the query tokens onto the patches through the Q-Former's cross-attention
step "$R/blip2.json" $PY -m visedit reading --model visedit-blip2 --out "$R/blip2.json" --json
step "$R/blip2-contributions.json" $PY -m visedit contributions --model visedit-blip2 --json --limit 96 --spread \
  --ig-limit 8 --out "$R/blip2-contributions.json"
echo "all results are in place"
