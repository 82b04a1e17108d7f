#!/usr/bin/env bash
# The study with its classifier cells JOBS at a time (default 2), on DVC's own parallel execution:
# the cells' upstream stages first (one `dvc repro`), then each cell as `dvc repro --single-item`
# in its own process (DVC releases its repository lock while a stage's command runs and takes
# per-path locks on its deps and outs; --wait-for-lock queues the short moments they need it),
# then one more `dvc repro` for what reads every cell (comparisons, report) and the rest. The
# result is the sequential `dvc repro`'s, byte for byte (tests/test_pipeline.py).
#
#   scripts/parallel-cells.sh 2                       # make demo, two cells at a time
#   PARALLEL_REPRO_ARGS=--no-run-cache scripts/parallel-cells.sh 4
#
# Each cell's classifier uses the CPU threads torch gives it: unless OMP_NUM_THREADS is set, the
# cells get C / JOBS threads each on C cores (at least 1). CPU results round by thread count
# (classifier.json records it): compare with a sequential run at the same count. On a cluster,
# run one cell per array task instead: scripts/cells-array.slurm.
set -euo pipefail
jobs="${1:-2}"
here="$(cd "$(dirname "$0")" && pwd)"
mapfile -t upstream < <(python "$here/cells.py" --upstream)
mapfile -t cells < <(python "$here/cells.py")
if ((${#upstream[@]})); then
  dvc repro ${PARALLEL_REPRO_ARGS:-} "${upstream[@]}"
fi
if ((${#cells[@]})); then
  threads="${OMP_NUM_THREADS:-$(( $(nproc) / jobs > 0 ? $(nproc) / jobs : 1 ))}"
  echo "parallel-cells: ${#cells[@]} cells, $jobs at a time, $threads thread(s) each" >&2
  printf '%s\n' "${cells[@]}" | OMP_NUM_THREADS="$threads" \
    xargs -P "$jobs" -n 1 dvc --wait-for-lock repro ${PARALLEL_REPRO_ARGS:-} --single-item
fi
dvc repro ${PARALLEL_REPRO_ARGS:-}
