"""Fixes for megatron-core 0.19.2 on paths megatron-mesh uses, on any machine.

Each fix names the megatron-core line it works around and changes nothing where that line is
not reached: the distributed-optimizer resume fixes apply only with torch's optimizers (neither
apex nor TransformerEngine: CPU runs and GPU images without them; found by the CPU stand-in of
tools/gpu_check.py, held by tests/parallel/test_parity.py::test_bf16_resume_is_exact); loading a
checkpoint that lacks TE's _extra_state entries (tests/checkpoint/test_checkpoints.py); fixed-shape
pipeline sends for the recursive block's carry (tests/parallel/test_parity.py); the loss
average of a run's first logged interval (tests/tools/test_pretrain.py, resume); the tracker
rewritten whole and a save into a used iteration directory starting clean
(tests/checkpoint/test_checkpoints.py); megatron's HuggingFaceTokenizer taking a tokenizer.json
(tests/tools/test_pretrain.py); checkpoints unpickled by an allowlist
(tests/checkpoint/test_checkpoint_unpickle.py).
"""

from __future__ import annotations

import os
from typing import Callable

import torch


def wrap_once(owner, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """``owner.name = wrap(owner.name)``, once per process and ``wrap`` however often the fixes
    are applied (several wraps of one function stack, each once)."""
    original = getattr(owner, name)
    key = f"{wrap.__module__}.{wrap.__qualname__}"
    applied = getattr(original, "_mesh_wraps", frozenset())
    if key in applied:
        return
    wrapped = wrap(original)
    wrapped._mesh_wraps = applied | {key}
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
    # fresh extra state instead (megatron_mesh.checkpoint.paths.keep_missing_extra_state).
    from megatron.core import dist_checkpointing

    from megatron_mesh.checkpoint.paths import keep_missing_extra_state

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


class _TrackerWrittenWhole:
    """megatron's storage shim (``maybe_msc``), opening the tracker for writing as a file written
    whole and renamed over it (megatron_mesh.checkpoint.paths.replacing_file)."""

    def __init__(self, storage):
        self._storage = storage

    def __getattr__(self, name):
        return getattr(self._storage, name)

    def open(self, path, mode="r", *args, **kwargs):
        from megatron.core.msc_utils import MultiStorageClientFeature

        from megatron_mesh.checkpoint.paths import TRACKER, replacing_file

        if (mode == "w" and not args and not kwargs and os.path.basename(str(path)) == TRACKER
                and not MultiStorageClientFeature.is_enabled()):
            return replacing_file(path)
        return self._storage.open(path, mode, *args, **kwargs)


def _write_the_tracker_whole() -> None:
    # training/checkpointing.py:1011 (save_checkpoint's iter_finalize_fn) rewrites the tracker in
    # place, `with maybe_msc.open(tracker_filename, 'w') as f: f.write(...)`: opening truncates
    # it and nothing fsyncs it, so a kill in between (or a crash before the page cache reached
    # the disk) leaves an empty tracker, which every reader refuses although every iteration is
    # intact. Open it through a shim that writes a temporary file, fsyncs and renames it over.
    from megatron.training import checkpointing

    if not isinstance(checkpointing.maybe_msc, _TrackerWrittenWhole):
        checkpointing.maybe_msc = _TrackerWrittenWhole(checkpointing.maybe_msc)


def _start_each_save_clean() -> None:
    # core/dist_checkpointing/serialization.py:420 saves into an iteration directory that an
    # earlier, interrupted save left behind with a warning only ("Overwriting old incomplete /
    # corrupted checkpoint"), and training/checkpointing.py:822 leaves it as it is ("TODO Handle
    # non-empty directories"). That save's manifests stay beside the new save's: at another
    # world size every reader then rejects the new, valid save ("manifests of different
    # saves"). The first rank removes them (and torch's and megatron's metadata) before saving;
    # no rank writes its manifest before the first rank has entered the save's collectives.
    from megatron.core import dist_checkpointing

    from megatron_mesh.checkpoint import manifest as checkpoint_manifest

    def wrap(save):
        def save_into_a_clean_directory(sharded_state_dict, checkpoint_dir, *args, **kwargs):
            first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
            removed = checkpoint_manifest.clear_earlier_save(checkpoint_dir) if first else []
            if removed:
                print(f"[mesh] {checkpoint_dir}: removed {', '.join(removed)} of an earlier, "
                      f"unfinished save of this iteration before saving it again", flush=True)
            return save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        return save_into_a_clean_directory

    wrap_once(dist_checkpointing, "save", wrap)


class _TokenizerByTheRule:
    """transformers' AutoTokenizer as megatron's HuggingFaceTokenizer calls it, but loading a
    tokenizer.json (a file, or a directory without a tokenizer_config.json naming a class) by
    the project's tokenizer rule (megatron_mesh.data.tokenizer.hf_tokenizer)."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path, *args, **kwargs):
        from transformers import AutoTokenizer

        from megatron_mesh.data.tokenizer import hf_tokenizer, tokenizer_source

        name = pretrained_model_name_or_path
        if not args and not kwargs.get("vocab_file") and tokenizer_source(name).kind == "tokenizer_json":
            return hf_tokenizer(name)
        return AutoTokenizer.from_pretrained(name, *args, **kwargs)


def _tokenizer_files_for_the_huggingface_tokenizer() -> None:
    # core/tokenizers/text/libraries/huggingface_tokenizer.py:70 hands --tokenizer-model to
    # AutoTokenizer.from_pretrained, which takes a hub name or a directory whose
    # tokenizer_config.json (or config.json) names the tokenizer's class: a tokenizer.json file
    # (GPT-NeoX-20B's, which docs/configuration.md and tools/preprocess_data.py take) fails as
    # an invalid hub repo id, a directory holding only tokenizer.json as "Unrecognized model".
    from megatron.core.tokenizers.text.libraries import huggingface_tokenizer

    huggingface_tokenizer.AutoTokenizer = _TokenizerByTheRule


def _unpickle_checkpoints_by_the_allowlist() -> None:
    # torch/distributed/checkpoint/filesystem.py:930 (FileSystemReader.read_metadata) reads
    # .metadata with pickle.load, default_planner.py:382 (load_bytes; :362 in torch 2.11) every
    # non-tensor item (megatron's common state, RNG, rerun, optimizer and TE extra state) with
    # torch.load(weights_only=False) (the same code in torch 2.11 and 2.13), and
    # core/dist_checkpointing/serialization.py:225 prefers an older save's common.pt wherever
    # one exists (torch.load's default, weights_only unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD).
    # A pickle planted in a shared checkpoint would run its code on resume, manifest or not (it
    # can be regenerated). Read them all by megatron_mesh.checkpoint.unpickle's allowlist, the
    # project's own readers' rule, and let a refusal out of torch's CheckpointException (a
    # BaseException) as the ValueError it is: the trainer then stops with "error: refusing ...".
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import serialization
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    from megatron_mesh.checkpoint import unpickle as checkpoint_unpickle

    FileSystemReader.read_metadata = checkpoint_unpickle.read_metadata  # same body, other unpickler
    DefaultLoadPlanner.load_bytes = checkpoint_unpickle.load_bytes
    serialization.load_common = checkpoint_unpickle.load_common
    wrap_once(FileSystemReader, "read_data", checkpoint_unpickle.naming_the_checkpoint)

    def wrap(load):
        def load_unwrapping_refusals(*args, **kwargs):
            with checkpoint_unpickle.refusals_unwrapped():
                return load(*args, **kwargs)
        return load_unwrapping_refusals

    wrap_once(dist_checkpointing, "load", wrap)
    wrap_once(dist_checkpointing, "load_common_state_dict", wrap)


def apply_trainer() -> None:
    """Fixes for megatron.training runs; call before ``pretrain``."""
    _unpickle_checkpoints_by_the_allowlist()
    _tokenizer_files_for_the_huggingface_tokenizer()
    _resume_distributed_optimizer_with_torch_adam()
    _load_checkpoints_of_another_spec()
    _pipeline_carry_shape()
    _reset_loss_averages_at_every_logged_interval()
    _write_the_tracker_whole()
    _start_each_save_clean()
