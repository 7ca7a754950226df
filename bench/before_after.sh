#!/usr/bin/env bash
# Before/after, interleaved: each named bench runs on an older revision, then on this
# checkout, back to back, with THIS checkout's bench code (so both measure the same way).
#   bench/before_after.sh REV bench1 [bench2 ...]      e.g. bench/before_after.sh 830bd1f redeem holds
# The older revision is checked out in .bench-base/ (a git worktree) and run with this
# checkout's venv: servers through POPDROP_BENCH_BIN, in-process benches (audience, drop)
# from a copy of the bench file inside the worktree. Outputs: bench/out/NAME.{before,after}.txt
set -u
cd "$(dirname "$0")/.."
rev=$1; shift
root=$PWD
base=$root/.bench-base
out=$root/bench/out
mkdir -p "$out"
if [ ! -d "$base" ]; then git worktree add --detach "$base" "$rev" >/dev/null; else git -C "$base" checkout -q --detach "$rev"; fi
site=$(echo "$root"/.venv/lib/python3*/site-packages)
if [ ! -x "$base/.venv/bin/python" ]; then
  python3 -m venv "$base/.venv"
  bsite=$(echo "$base"/.venv/lib/python3*/site-packages)
  echo "$base/src" > "$bsite/00base.pth"   # the old code first, this venv's packages after
  echo "$site" > "$bsite/zz_deps.pth"
  printf '#!%s\nimport sys\nfrom popdrop.cli import app\nif __name__ == "__main__":\n    sys.exit(app())\n' \
    "$base/.venv/bin/python" > "$base/.venv/bin/popdrop"
  chmod +x "$base/.venv/bin/popdrop"
fi
for b in "$@"; do
  case $b in
    audience|drop)
      cp "bench/$b.py" bench/_common.py "$base/bench/"
      (cd "$base" && .venv/bin/python "bench/$b.py" --quick) > "$out/$b.before.txt" 2>&1 ;;
    *)
      POPDROP_BENCH_BIN="$base/.venv/bin/popdrop" .venv/bin/python "bench/$b.py" --quick > "$out/$b.before.txt" 2>&1 ;;
  esac
  echo "$b before ($?): $(tail -1 "$out/$b.before.txt")"
  .venv/bin/python "bench/$b.py" --quick > "$out/$b.after.txt" 2>&1
  echo "$b after ($?): $(tail -1 "$out/$b.after.txt")"
done
