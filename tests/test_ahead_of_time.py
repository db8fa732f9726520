"""model/ahead_of_time.py: the signature a kernel is compiled ahead of time with is laid out from
the kernel's own parameters, whatever order the caller wrote, and a parameter left out, unknown or
given twice is refused by name (no GPU needed: the source is built, not compiled)."""
from __future__ import annotations

import pytest

from ros_infmllm.model import decode_kernels
from ros_infmllm.model.ahead_of_time import kernel_source

COMBINE_TYPES = dict(q_ptr="*bf16", k_new_ptr="*bf16", v_new_ptr="*bf16", scores_ptr="*fp32", max_ptr="*fp32",
                     sum_ptr="*fp32", acc_ptr="*fp32", out_ptr="*bf16", mass_ptr="*fp32", codes_ptr="*i8",
                     x_stats_ptr="*fp32", capacity="i32", scale="fp32")
COMBINE_CONSTANTS = dict(GROUP=1, ROWS=1, DIM=128, NUM_SPLITS=33, SPLITS_PAD=64, SPLIT_CHUNK=64, MASS_BLOCK=256,
                         PDL=True)


def test_signature_follows_the_kernels_parameters_and_fills_defaults() -> None:
    kernel = decode_kernels.combine_attention
    reversed_types = dict(reversed(list(COMBINE_TYPES.items())))
    source = kernel_source(kernel, reversed_types, dict(reversed(list(COMBINE_CONSTANTS.items()))),
                           aligned=["q_ptr", "acc_ptr"])
    names = list(kernel.arg_names)
    assert list(source.signature) == names  # the kernel's order, not the caller's
    assert all(source.signature[n] == COMBINE_TYPES[n] for n in COMBINE_TYPES)
    constants = {names[key[0]]: value for key, value in source.constants.items()}
    # every constexpr has its value at its own position; X8_GROUP / X8_SPLIT took their defaults
    assert constants == dict(COMBINE_CONSTANTS, X8_GROUP=0, X8_SPLIT=False)
    assert {names[key[0]] for key in source.attrs} == {"q_ptr", "acc_ptr"}


@pytest.mark.parametrize("change,message", [
    (lambda types, constants: types.pop("scale"), r"no type or constant for \['scale'\]"),
    (lambda types, constants: constants.pop("DIM"), r"no type or constant for \['DIM'\]"),
    (lambda types, constants: constants.update(BLOCK=16), r"unknown parameters \['BLOCK'\]"),
    (lambda types, constants: constants.update(scale=1.0), r"given twice \['scale'\]"),
])
def test_a_parameter_missing_unknown_or_given_twice_is_named(change, message) -> None:
    types, constants = dict(COMBINE_TYPES), dict(COMBINE_CONSTANTS)
    change(types, constants)
    with pytest.raises(ValueError, match=message):
        kernel_source(decode_kernels.combine_attention, types, constants)
