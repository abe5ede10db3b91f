"""Test-wide settings, inherited by the notebook kernels that nbval starts.

The suite is offline and quick by design: the `smoke` profile, no Hub
requests (a Hub request here retries for ~50 s before failing), and no
progress bars (their rates would differ between runs and break nbval's
output comparison), and torch on 2 threads wherever ``set_seed`` runs (the
last digits of a CPU run depend on the thread count; see
``lora_helpers.utils.set_seed``). Each is a default: export another value to
override.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LORA_PROFILE", "smoke")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LORA_NUM_THREADS", "2")
