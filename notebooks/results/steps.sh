# Shared by the results scripts (sourced): one resumable step, and two lanes of steps side by side.
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
