#!/usr/bin/env bash
# Run notebooks top to bottom on the GPU in the `quick` profile, headless, and report
# pass/fail and the time of each: the check for device bugs (a CUDA tensor meeting a CPU
# one) that never show on a CPU. Executed copies go to a scratch folder; the committed
# notebooks are not touched (their outputs are the CPU run that nbval compares against).
#
#   bash tools/device_smoke.sh                      # every notebook
#   bash tools/device_smoke.sh notebooks/03_*.ipynb # some
#
# Writes results to ${OUT:-/tmp/device_smoke}: one executed notebook per input, its log,
# and summary.tsv (notebook, status, seconds, device). Exit status 1 if any notebook failed.
# On a machine without CUDA it says so and runs on the CPU (useful only to test this script).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/device_smoke}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LORA_PROFILE=quick TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
device=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
if [ "$device" = "cpu" ]; then
  echo "warning: no CUDA device here; the notebooks run on the CPU (this only tests the script)" >&2
fi
python -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}, device: $device')"
notebooks=("$@")
[ ${#notebooks[@]} -gt 0 ] || notebooks=(notebooks/[0-9][0-9]_*.ipynb)
printf "notebook\tstatus\tseconds\tdevice\n" > "$out/summary.tsv"
failed=0
for nb in "${notebooks[@]}"; do
  name=$(basename "$nb" .ipynb)
  start=$SECONDS
  if jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=1800 \
      --ExecutePreprocessor.kernel_name=python3 --output-dir "$out" --output "$name" "$nb" > "$out/$name.log" 2>&1; then
    status=pass
  else
    status=FAIL
    failed=1
  fi
  seconds=$((SECONDS - start))
  printf "%s\t%s\t%s\t%s\n" "$name" "$status" "$seconds" "$device" >> "$out/summary.tsv"
  printf "%-40s %-5s %5d s\n" "$name" "$status" "$seconds"
  [ "$status" = pass ] || tail -n 25 "$out/$name.log"
done
exit $failed
