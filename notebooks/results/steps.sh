# Shared by the results scripts (sourced): one resumable step, two lanes of steps side by side, and the
# layer sweep's rows (one settings line for every model's sweep).
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
