# Shared by reproduce.sh and study.sh (sourced): one resumable step of a results script.
step() {  # step OUTPUT COMMAND...: run COMMAND unless OUTPUT exists (DRY=1: only print it)
  local out=$1; shift
  if [[ -e $out ]]; then echo "done    $out"; return; fi
  echo "run     $out: $(printf '%q ' "$@")"
  [[ -n "${DRY:-}" ]] && return
  local t0=$SECONDS
  "$@"
  echo "        $out: $((SECONDS - t0)) s"
}
