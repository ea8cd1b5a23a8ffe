# Shared by reproduce.sh and study.sh (sourced): one resumable step of a results script.
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
