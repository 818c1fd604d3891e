"""SchemeOptions are read from the model config by name: none is left at its default."""

import dataclasses

from conftest import tiny_config
from megatron_mesh.recurrence.fused_mesh import CycleCompile
from megatron_mesh.recurrence.mesh import SchemeOptions


def _options(cfg) -> dict:
    options = SchemeOptions.of(cfg)
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def test_every_option_comes_from_the_config():
    mesh = tiny_config(init_method_std=0.05, cycle_impl="eager", cycle_compile_fallback=True,
                       layernorm_epsilon=1e-6, buffer_slots=7)
    injection = tiny_config(scheme="linear_injection", initial_state="random", initial_state_std=0.3)
    assert _options(mesh) == dict(
        hidden_size=64, num_loops=2, init_method=mesh.init_method, init_method_std=0.05, buffer_slots=7,
        cycle_impl="eager", compile_options=CycleCompile(fallback=True), initial_state="zero",
        initial_state_std=mesh.initial_state_std, layernorm_epsilon=1e-6, normalization="LayerNorm")
    assert _options(tiny_config(layer_family="llama"))["normalization"] == "RMSNorm"
    assert _options(injection)["initial_state"] == "random"
    assert _options(injection)["initial_state_std"] == 0.3


def test_a_scheme_without_a_buffer_has_no_slots():
    assert SchemeOptions.of(tiny_config(scheme="anchor")).buffer_slots == 0
