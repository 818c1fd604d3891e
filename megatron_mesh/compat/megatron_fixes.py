"""Fixes for megatron-core 0.19.2 on paths megatron-mesh uses, on any machine.

Each fix names the megatron-core line it works around and changes nothing where that line is
not reached: the distributed-optimizer resume fixes apply only with torch's optimizers (neither
apex nor TransformerEngine: CPU runs and GPU images without them; found by the CPU stand-in of
tools/gpu_check.py, held by tests/parallel/test_parity.py::test_bf16_resume_is_exact); loading a
checkpoint that lacks TE's _extra_state entries (tests/test_checkpoints.py); fixed-shape
pipeline sends for the recursive block's carry (tests/parallel/test_parity.py); the loss
average of a run's first logged interval (tests/tools/test_pretrain.py, resume).
"""

from __future__ import annotations

from typing import Callable

import torch


def wrap_once(owner, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """``owner.name = wrap(owner.name)``, once per process however often the fixes are applied."""
    original = getattr(owner, name)
    if getattr(original, "_mesh_fixed", False):
        return
    wrapped = wrap(original)
    wrapped._mesh_fixed = True
    setattr(owner, name, wrapped)


def _resume_distributed_optimizer_with_torch_adam() -> None:
    # Resuming with --use-distributed-optimizer (dp_reshardable checkpoints, the default). 1-3
    # are bugs of the torch-AdamW path (neither apex nor TE installed):
    # 1. optimizer/distrib_optimizer.py:837 (state_dict) asserts that torch AdamW's state holds
    #    exactly one 'step'. Loading builds the optimizer's sharded state dict first (:1532),
    #    when the state is still empty (torch allocates it at the first step), so the resume stops
    #    on that assertion. Allocate the state with megatron's own dummy step (:1422, which its
    #    FSDP path calls for the same reason); the checkpoint then overwrites every state tensor
    #    and the parameters.
    # 2. load_state_dict restores the per-parameter 'step' from the saved param_groups as ONE
    #    tensor shared by every parameter (:1010); torch AdamW increments each parameter's step
    #    in place, so after a resume the k-th parameter's bias correction runs k steps ahead.
    #    Give each parameter its own step tensor after loading.
    # 3. load_parameter_state_from_dp_reshardable (:1084) then copies the step tensor the sharded
    #    state dict kept from before loading (a LocalNonpersistentObject, :1946) over the
    #    restored one (_set_main_param_and_optimizer_states, :1193). Skip 'step' there.
    # 4. (with apex or TE too) _set_main_param_and_optimizer_states copies into the main
    #    parameters outside no_grad; in fp32 they are views of the model's parameters, which
    #    require grad, so an fp32 resume raises "a view of a leaf Variable ... in-place".
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    if getattr(cls, "_mesh_fixed", False):
        return
    cls._mesh_fixed = True
    set_states = torch.no_grad()(cls._set_main_param_and_optimizer_states)
    cls._set_main_param_and_optimizer_states = set_states
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    state_dict, load_state_dict = cls.state_dict, cls.load_state_dict

    def allocating_state_dict(self):
        if len(self.optimizer.state) == 0 and not self.ddp_config.use_megatron_fsdp:
            self._init_optimizer_states_with_dummy_values()
        return state_dict(self)

    def load_with_own_steps(self, loaded):
        load_state_dict(self, loaded)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    def set_states_but_step(self, model_param, tensors):
        return set_states(self, model_param, {**tensors, "step": None})  # None: not copied

    cls.state_dict = allocating_state_dict
    cls.load_state_dict = load_with_own_steps
    cls._set_main_param_and_optimizer_states = set_states_but_step


def _load_checkpoints_of_another_spec() -> None:
    # training/checkpointing.py:1601 (_load_base_checkpoint) loads with the model's sharded
    # state dict, which under the TransformerEngine spec asks for TE's _extra_state entries; a
    # checkpoint saved under the local spec (CPU, convert.py hf-to-megatron) lacks some, and
    # torch's load planner raises "Missing key in checkpoint state_dict" (megatron's default
    # strictness, assume_ok_unexpected, does not look for missing keys). Keep those modules'
    # fresh extra state instead (megatron_mesh.checkpoints.keep_missing_extra_state).
    from megatron.core import dist_checkpointing

    from megatron_mesh.checkpoints import keep_missing_extra_state

    def wrap(load):
        def load_keeping_missing_extra_state(sharded_state_dict, checkpoint_dir, *args, **kwargs):
            kept = keep_missing_extra_state(sharded_state_dict, checkpoint_dir)
            if kept and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
                print(f"[mesh] {checkpoint_dir}: no saved state for {len(kept)} _extra_state "
                      f"entries (TransformerEngine fp8 metadata; e.g. {kept[0]}): those modules "
                      f"keep their fresh state", flush=True)
            return load(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        return load_keeping_missing_extra_state

    wrap_once(dist_checkpointing, "load", wrap)


def _pipeline_carry_shape() -> None:
    # pipeline_parallel/schedules.py sizes every P2P receive [s, b, config.hidden_size]
    # (get_tensor_shapes :2116, the interleaved schedule :1157); a recursive block's stages hand
    # over [s, b, W] carries (megatron_mesh.parallel.carry). megatron's answer to other
    # shapes, variable_seq_lengths, exchanges shapes before every send and receive
    # (p2p_communication.py:186 _communicate_shapes: a blocking handshake, a device sync and a
    # device-to-host copy). The carry's W is fixed per run: receive that width instead.
    from megatron.core.pipeline_parallel import p2p_communication

    def wrap(communicate):
        def communicate_carry_shape(self, *, tensor_shape, **kwargs):
            width = getattr(self.config, "pipeline_carry_width", None)
            if width and tensor_shape:
                tensor_shape = (*tensor_shape[:-1], width)
            return communicate(self, tensor_shape=tensor_shape, **kwargs)
        return communicate_carry_shape

    wrap_once(p2p_communication.P2PCommunicator, "_communicate", wrap)


def _reset_loss_averages_at_every_logged_interval() -> None:
    # training/training.py:2594 (training_log): `should_reset = not is_first_iteration`, so a
    # run's first iteration is printed without resetting the loss accumulators. When that
    # iteration falls on a log interval (every run with logging.interval 1; a resumed run whose
    # first iteration is a multiple of the interval) the next printed loss averages two
    # intervals: a resumed run logs another loss than the run it continues. Log such a first
    # iteration as any other interval (training.py:3997 passes is_first_iteration by keyword).
    from megatron.training import get_args, training

    def wrap(log):
        def training_log(*args, **kwargs):
            iteration = args[3] if len(args) > 3 else kwargs["iteration"]
            if kwargs.get("is_first_iteration") and iteration % get_args().log_interval == 0:
                kwargs["is_first_iteration"] = False
            return log(*args, **kwargs)
        return training_log

    wrap_once(training, "training_log", wrap)


def apply_trainer() -> None:
    """Fixes for megatron.training runs; call before ``pretrain``."""
    _resume_distributed_optimizer_with_torch_adam()
    _load_checkpoints_of_another_spec()
    _pipeline_carry_shape()
    _reset_loss_averages_at_every_logged_interval()
