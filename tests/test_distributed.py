"""Data-parallel LoRA (notebook 07) on 2 CPU processes: what is synchronised, and that it equals one process."""

import pytest

from lora_helpers.distributed import main, run_data_parallel
from lora_helpers.lora import lora_parameters


def test_two_processes_send_only_lora_and_head_gradients_and_match_one_process():
    out = run_data_parallel(world_size=2, steps=3, batch_size=8, max_length=16, kind="tiny")
    # tiny model: 2 layers, 32 wide, r = 8 on q_lin and v_lin;
    # head = pre_classifier (32x32 + 32) + classifier (32x2 + 2)
    trainable = lora_parameters([(32, 32)] * 2 * 2, r=8) + 32 * 32 + 32 + 32 * 2 + 2
    assert out["values_per_step"] == trainable  # measured by the communication hook
    assert out["bytes_per_step"] == 4 * trainable  # fp32 gradients
    assert out["bytes_per_step"] < out["full_ft_bytes_per_step"] / 5
    assert out["local_batch"] == 4  # each process saw half of every global batch...
    assert out["losses_ddp_rank0"] != out["losses_single"]  # ...so its loss is not the global batch's
    # the averaged gradients are the whole batch's (a sum over processes would be 2x, one slice's would differ)
    assert out["grad_max_abs"] > 1e-4
    assert out["grad_max_abs_diff"] < 1e-4 * out["grad_max_abs"]
    assert out["max_update"] > 1e-4  # training moved the parameters...
    assert out["max_abs_diff"] < 1e-3 * out["max_update"]  # ...and two processes moved them as one does


def test_bad_arguments_are_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="split evenly"):
        run_data_parallel(world_size=3, batch_size=8, kind="tiny")
    with pytest.raises(ValueError, match="kind must be one of \\['standin', 'tiny'\\]"):
        run_data_parallel(world_size=2, batch_size=8, kind="gpt")
    with pytest.raises(SystemExit):
        main(["--nproc", "0"])
