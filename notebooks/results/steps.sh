# Shared by the results scripts (sourced): one resumable step, two lanes of steps side by side, the layer
# sweep's rows (one settings line for every model's sweep), and the rules that pick tuned settings.
# The caller sets PY, R (its results folder) and KEY (the embedded model whose presets apply, or empty).
step() {  # step OUTPUT COMMAND...: run COMMAND unless OUTPUT exists (DRY=1: only print it)
  local out=$1; shift
  # an evaluation writes its folder as it goes and its summary.json last: a folder of per-edit lines without a
  # summary was interrupted, and the same command without --fresh resumes it where it stopped
  if [[ -d $out && -e $out/edits.jsonl && ! -e $out/summary.json ]]; then
    local args=() a
    for a in "$@"; do [[ $a == --fresh ]] || args+=("$a"); done
    echo "resume  $out: $(printf '%q ' "${args[@]}")"
    [[ -n "${DRY:-}" ]] && return
    "${args[@]}"
    return
  fi
  if [[ -e $out ]]; then echo "done    $out"; return; fi
  echo "run     $out: $(printf '%q ' "$@")"
  [[ -n "${DRY:-}" ]] && return
  local t0=$SECONDS
  "$@"
  echo "        $out: $((SECONDS - t0)) s"
}

lanes() {  # lanes FN_A FN_B: two independent lists of steps; with JOBS=2 side by side, one thread each
  if [[ ${JOBS:-1} == 2 && -z ${DRY:-} ]]; then
    (export OMP_NUM_THREADS=1; "$1") & local a=$!
    (export OMP_NUM_THREADS=1; "$2") & local b=$!
    local ra=0 rb=0
    wait $a || ra=$?
    wait $b || rb=$?
    if (( ra || rb )); then echo "a lane failed ($1: exit $ra, $2: exit $rb)" >&2; exit 1; fi
  else
    "$1"
    "$2"
  fi
}

sweep_out() {  # sweep_out [answer] [NAME:KEY=VALUE] LAYER...: one reduced-budget VEAD row per layer at the
  # paper's placement, on the model M (an array of --model arguments), trained in W/sweep, committed to R/sweep
  # answer: VEAD's memory reads the new answer (ours, the preset's); otherwise the edit sample (the paper's)
  # NAME:KEY=VALUE: one more setting (--set KEY=VALUE), its rows committed as NAME-….json
  local layer tag prefix= suffix=-memory_readssample extra=(--set memory_reads=sample)
  if [[ $1 == answer ]]; then prefix=answer-; suffix=-memory_readsanswer; extra=(--set memory_reads=answer); shift; fi
  if [[ $1 == *:*=* ]]; then
    prefix=${1%%:*}-$prefix; suffix+=-${1#*:}; suffix=${suffix/=/}; extra+=(--set "${1#*:}"); shift
  fi
  for layer in "$@"; do
    tag=layer$layer
    if [[ -e $R/sweep/$prefix$tag.json ]]; then echo "done    $R/sweep/$prefix$tag.json"; continue; fi
    step "$W/sweep/$tag-w_loc3-w_im0.1-lr0.003-eosFalse$suffix.json" $PY -m visedit sweep-vead "${M[@]}" --json \
      --at output --im-reads prompt --limit 600 --steps 1000 --eval-limit 100 --decay-share 0 --set hard_loc=0 \
      --set w_loc=3 --set w_im=0.1 --set lr=0.003 --set eos=false "${extra[@]}" --out "$W/sweep" --layers "$layer"
    [[ -n "${DRY:-}" ]] && continue
    mkdir -p "$R/sweep"
    cp "$W/sweep/$tag-w_loc3-w_im0.1-lr0.003-eosFalse$suffix.json" "$R/sweep/$prefix$tag.json"
  done
}

im_image_row() {  # im_image_row LAYER: the answer-memory sweep row at the output of LAYER with the IM reading the edit
  # image's visual tokens instead of the prompt (ours, the option the first model's preset uses), committed to
  # R/sweep/im-image-answer-layerLAYER.json
  local imi=layer$1-im-image-w_loc3-w_im0.1-lr0.003-eosFalse-memory_readsanswer
  if [[ -e $R/sweep/im-image-answer-layer$1.json ]]; then
    echo "done    $R/sweep/im-image-answer-layer$1.json"
    return
  fi
  step "$W/sweep/$imi.json" $PY -m visedit sweep-vead "${M[@]}" --json --at output --im-reads image --limit 600 \
    --steps 1000 --eval-limit 100 --decay-share 0 --set hard_loc=0 --set w_loc=3 --set w_im=0.1 --set lr=0.003 \
    --set eos=false --set memory_reads=answer --out "$W/sweep" --layers "$1"
  [[ -n "${DRY:-}" ]] || cp "$W/sweep/$imi.json" "$R/sweep/im-image-answer-layer$1.json"
}

caption_baselines() {  # E-IC, the caption edits: the baselines with their E-VQA settings on every caption eval edit
  local e
  for e in none ft_l ft_v ike; do
    step "$R/evaluate-caption/$e" $PY -m visedit evaluate "${M[@]}" --task caption --editor $e --json --fresh \
      --out "$R/evaluate-caption/$e"
  done
}

caption_mend() {  # E-IC: MEND trained on the caption train split (one editor per dataset, as the paper), evaluated
  step "$T/mend-caption" $PY -m visedit train-mend "${M[@]}" --task caption --json --out "$T/mend-caption"
  step "$R/evaluate-caption/mend" $PY -m visedit evaluate "${M[@]}" --task caption --editor mend \
    --weights "$T/mend-caption" --json --fresh --out "$R/evaluate-caption/mend"
}

to_file() {  # to_file FILE COMMAND...: stdout of COMMAND written atomically to FILE
  local file=$1; shift
  mkdir -p "$(dirname "$file")"
  "$@" > "$file.part" && mv "$file.part" "$file"
}

tune_baselines() {  # tune_baselines FTL_LAYERS: FT-L, FT-V and IKE tuned on 40 train edits of M's model, FT-L over the
  # layers FTL_LAYERS (a JSON list), into R/tune; then each preset must hold its tune's best (check_tune)
  step "$R/tune/ft_l.json" to_file "$R/tune/ft_l.json" $PY -m visedit tune "${M[@]}" --json --editor ft_l \
    --grid "{\"layer\": $1, \"lr\": [1e-3, 3e-4]}"
  step "$R/tune/ft_v.json" to_file "$R/tune/ft_v.json" $PY -m visedit tune "${M[@]}" --json --editor ft_v \
    --grid '{"lr": [1e-2, 1e-3, 1e-4], "vision_layers": [0, 1]}'
  step "$R/tune/ike.json" to_file "$R/tune/ike.json" $PY -m visedit tune "${M[@]}" --json --editor ike \
    --grid '{"n_demos": [0, 2, 4, 8]}'
  local e
  for e in ft_l ft_v ike; do check_tune $e; done
}

check_tune() {  # the preset must hold tune's best setting
  [[ -n "${DRY:-}" ]] && return
  $PY - "$R/tune/$1.json" "$1" "$KEY" <<'EOF'
import json, sys
from visedit.editing import load_preset
model = sys.argv[3] or None
best, preset = json.load(open(sys.argv[1]))["best"], load_preset(sys.argv[2], model=model)
differs = {k: (v, preset.get(k)) for k, v in best.items() if preset.get(k) != v}
if differs:
    where = f"{model}/" if model else ""
    sys.exit(f"tune's best for {sys.argv[2]} differs from its preset (best, preset): {differs}; "
             f"edit (or create) visedit/editing/presets/{where}{sys.argv[2]}.yaml, then run this script again")
EOF
}

scoped_pick() {  # scoped_pick KIND VALUE...: route-min: the first value whose M-locality and in-image locality
  # reach 0.95 on the train edits (else the last); learned-route-min: the value with the best mean of all seven
  # probes (the five metrics, in-image and look-alike locality); *refine-lr: the value with the best five-metric
  # mean (DRY: a placeholder)
  if [[ -n "${DRY:-}" ]]; then echo TUNED; return; fi
  $PY - "$R/scoped-tune" "$@" <<'PY'
import json, sys
from pathlib import Path
root, kind, values = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
runs = {v: json.loads((root / f"{kind}{v}" / "summary.json").read_text()) for v in values}
if kind == "route-min":
    print(next((v for v in values if min(runs[v]["m_locality"], runs[v]["i_locality"]) >= 0.95), values[-1]))
elif kind == "learned-route-min":
    probes = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality", "i_locality", "la_locality")
    print(max(values, key=lambda v: sum(runs[v][p] for p in probes)))
else:
    print(max(values, key=lambda v: runs[v]["mean"]))
PY
}
