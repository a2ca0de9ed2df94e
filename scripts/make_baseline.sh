#!/usr/bin/env bash
# Usage: scripts/make_baseline.sh COMMIT [DIR]
# An older checkout as a second package, `ppold`, in DIR (default .old, git-ignored): the files of
# COMMIT with every `prunepath_jax` renamed, so it installs beside the working tree
# (`pip install --target ... .old`) and `benchmarks/megastep_decode.py --baseline ppold.megastep`
# times it first in every round of the same process — code changes that no launch field switches,
# compared side by side.
set -euo pipefail
commit=$1
dir=${2:-.old}
rm -rf "$dir" && mkdir -p "$dir"
git archive "$commit" prunepath_jax kernels train eval pyproject.toml README.md | tar -x -C "$dir"
mv "$dir/prunepath_jax" "$dir/ppold"
find "$dir" -name '*.py' -o -name pyproject.toml | xargs sed -i 's/prunepath_jax/ppold/g; s/prunepath-jax/ppold/g'
sed -i '/^\[project.scripts\]/,/^$/d' "$dir/pyproject.toml"  # no second `prunepath` command
echo "$dir: ppold at $(git rev-parse --short "$commit")"
