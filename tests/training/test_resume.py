"""Checks before loading a checkpoint (megatron_mesh.training.resume)."""

from argparse import Namespace
from pathlib import Path

import pytest

from megatron_mesh.training.resume import _check_optimizer_layout

CKPT = Path("/ckpt/iter_0000100")


def common(tp, pp, sharding):
    return {"args": Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
            "content_metadata": {"distrib_optim_sharding_type": sharding}}


def run_args(tp=1, pp=1, distributed=True, no_load_optim=False, finetune=False):
    return Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     use_distributed_optimizer=distributed, no_load_optim=no_load_optim,
                     finetune=finetune)


def test_dp_reshardable_optimizer_state_refuses_another_tp_or_pp_with_what_to_do():
    with pytest.raises(ValueError) as err:
        _check_optimizer_layout(run_args(tp=1, pp=1), CKPT, common(1, 2, "dp_reshardable"))
    message = str(err.value)
    assert str(CKPT) in message and "TP=1, PP=2" in message and "not at TP=1, PP=1" in message
    assert "--no-load-optim" in message and "checkpointing.optimizer_reshardable: true" in message


@pytest.mark.parametrize("args, saved", [
    (run_args(tp=2, pp=1), common(2, 1, "dp_reshardable")),  # same TP/PP (DP may differ)
    (run_args(tp=1), common(1, 2, "fully_reshardable")),  # saved reshardable
    (run_args(tp=1, no_load_optim=True), common(1, 2, "dp_reshardable")),  # weights only
    (run_args(tp=1, finetune=True), common(1, 2, "dp_reshardable")),
    (run_args(tp=1, distributed=False), common(1, 2, "dp_reshardable")),  # megatron decides
])
def test_loadable_layouts_pass(args, saved):
    _check_optimizer_layout(args, CKPT, saved)
