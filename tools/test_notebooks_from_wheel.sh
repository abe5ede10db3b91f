#!/usr/bin/env bash
# The notebooks as a learner runs them: lora_helpers built as a wheel and installed (not the
# editable checkout), the notebooks copied alone into an empty folder (no repository around
# them, as on Colab), the default profile (LORA_PROFILE unset), each notebook executed top to
# bottom by nbval and compared with its saved outputs. Uses the active environment; puts the
# editable install back at the end.
#   bash tools/test_notebooks_from_wheel.sh                                  # every notebook
#   bash tools/test_notebooks_from_wheel.sh 01_svd_low_rank_intuition.ipynb  # some
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
restore() { python -m pip install -q --no-deps -e "$root" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap restore EXIT

python -m pip wheel -q --no-deps -w "$work/dist" "$root"
python -m pip install -q --no-deps --force-reinstall "$work"/dist/lora_helpers-*.whl
cp -r "$root/notebooks" "$work/notebooks"
rm -rf "$work/notebooks/.ipynb_checkpoints"
cd "$work/notebooks"
python - <<'PY'
import lora_helpers
assert "site-packages" in lora_helpers.__file__, f"lora_helpers imported from {lora_helpers.__file__}, not the wheel"
print(f"lora_helpers from the wheel: {lora_helpers.__file__}; committed runs: {lora_helpers.compare.committed_runs()}")
PY

# offline, no progress bars, torch on 2 threads, passive OpenMP waits for two workers side by side (as conftest.py)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false LORA_NUM_THREADS=2
export OMP_WAIT_POLICY=PASSIVE
export LORA_IMDB_DIR=${LORA_IMDB_DIR:-$root/../shared/data/imdb}
unset LORA_PROFILE
notebooks=("$@")
[ ${#notebooks[@]} -gt 0 ] || notebooks=([0-9][0-9]_*.ipynb)
python -m pytest -p no:cacheprovider -o addopts="" --rootdir="$work/notebooks" -n 2 --dist loadfile \
  --nbval --nbval-current-env --nbval-sanitize-with "$root/.ci/nbval_sanitize.cfg" --durations=10 "${notebooks[@]}"
