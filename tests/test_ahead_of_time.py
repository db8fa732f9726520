"""model/ahead_of_time.py: the signature a kernel is compiled ahead of time with is laid out from
the kernel's own parameters, whatever order the caller wrote, and a parameter left out, unknown or
given twice is refused by name. The checks run in a process of their own, outside Triton's
interpreter (as every ahead-of-time compile does: interpreted kernels cannot be compiled), and
build the source only, no compile."""
from __future__ import annotations

import os
import subprocess
import sys

from triton_device import DEVICE  # noqa: F401  (before the kernels: sets TRITON_INTERPRET on a CPU)

import pytest  # noqa: E402

from ros_infmllm.model import decode_kernels  # noqa: E402
from ros_infmllm.model.ahead_of_time import kernel_source  # noqa: E402

CHECKS = r"""
import re
from ros_infmllm.model import decode_kernels
from ros_infmllm.model.ahead_of_time import kernel_source

TYPES = dict(q_ptr="*bf16", k_new_ptr="*bf16", v_new_ptr="*bf16", scores_ptr="*fp32", max_ptr="*fp32",
             sum_ptr="*fp32", acc_ptr="*fp32", out_ptr="*bf16", mass_ptr="*fp32", codes_ptr="*i8",
             x_stats_ptr="*fp32", capacity="i32", scale="fp32")
CONSTANTS = dict(GROUP=1, ROWS=1, DIM=128, NUM_SPLITS=33, SPLITS_PAD=64, SPLIT_CHUNK=64, MASS_BLOCK=256, PDL=True)
kernel = decode_kernels.combine_attention
names = list(kernel.arg_names)
source = kernel_source(kernel, dict(reversed(list(TYPES.items()))), dict(reversed(list(CONSTANTS.items()))),
                       aligned=["q_ptr", "acc_ptr"])
assert list(source.signature) == names  # the kernel's order, not the caller's
assert all(source.signature[n] == TYPES[n] for n in TYPES)
constants = {names[key[0]]: value for key, value in source.constants.items()}
# every constexpr has its value at its own position; X8_GROUP / X8_SPLIT took their defaults
assert constants == dict(CONSTANTS, X8_GROUP=0, X8_SPLIT=False), constants
assert {names[key[0]] for key in source.attrs} == {"q_ptr", "acc_ptr"}
print("checked order")
for change, message in [(lambda t, c: t.pop("scale"), r"no type or constant for \['scale'\]"),
                        (lambda t, c: c.pop("DIM"), r"no type or constant for \['DIM'\]"),
                        (lambda t, c: c.update(BLOCK=16), r"unknown parameters \['BLOCK'\]"),
                        (lambda t, c: c.update(scale=1.0), r"given twice \['scale'\]")]:
    types, constants = dict(TYPES), dict(CONSTANTS)
    change(types, constants)
    try:
        kernel_source(kernel, types, constants)
    except ValueError as error:
        assert re.search(message, str(error)), str(error)
        print("checked refusal")
    else:
        raise AssertionError(message)
"""


def test_signature_follows_the_kernel_and_refuses_what_does_not_fit() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checked order") == 1 and done.stdout.count("checked refusal") == 4


@pytest.mark.skipif(DEVICE.type == "cuda", reason="kernels are interpreted only where no GPU is")
def test_an_interpreted_kernel_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="an interpreted kernel"):
        kernel_source(decode_kernels.combine_attention, {}, {})
