#!/usr/bin/env bash
# Execute notebooks in place, top to bottom in a fresh kernel, with the same
# settings as the test suite (see conftest.py), so that the saved outputs are
# the ones nbval compares against.
#   bash tools/execute_notebooks.sh                   # every notebook
#   bash tools/execute_notebooks.sh notebooks/02_*.ipynb
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false LORA_NUM_THREADS=2
# idle OpenMP threads sleep: two notebooks executed side by side must not spin against each other
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
unset LORA_PROFILE  # the default profile (quick on a CPU), as a learner gets it
# the offline IMDb copy beside the repository, if there is one (else load_imdb's own search)
[ -n "${LORA_IMDB_DIR:-}" ] || [ ! -d ../shared/data/imdb ] || export LORA_IMDB_DIR=$(cd ../shared/data/imdb && pwd)
notebooks=("$@")
[ ${#notebooks[@]} -gt 0 ] || notebooks=(notebooks/[0-9][0-9]_*.ipynb)
for nb in "${notebooks[@]}"; do
  echo "== $nb"
  start=$SECONDS
  jupyter nbconvert --to notebook --execute --inplace \
    --ExecutePreprocessor.timeout=3600 --ExecutePreprocessor.kernel_name=python3 "$nb"
  python tools/clean_notebook.py "$nb"
  echo "   done in $((SECONDS - start)) s"
done
