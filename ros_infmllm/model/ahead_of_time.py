"""A Triton kernel compiled ahead of time for a GPU that is not here (sm_90, sm_87): what tests
and benchmarks use to check registers, shared memory and instructions on a machine without one.

Why a module of its own: Triton's ``ASTSource`` takes the signature as a dict that must list the
kernel's parameters in the kernel's own order, and its constants by position in that dict; a dict
written by hand in another order, or missing a parameter, compiled the wrong constants without a
word, or failed deep inside the compiler. Here the signature is laid out from the kernel's
parameter names, and a name missing, unknown or given twice is an error that names it.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable


def kernel_source(kernel: Any, types: dict[str, str], constants: dict[str, Any], aligned: Iterable[str] = ()):
    """``ASTSource`` of a ``@triton.jit`` kernel: ``types`` for its run-time parameters (``"*bf16"``,
    ``"i32"``, ...), ``constants`` for its ``tl.constexpr`` ones (a constant with a default may be
    left out), ``aligned`` the pointers taken as 16-byte aligned, as Triton specialises them at run
    time (only then are loads copied asynchronously into shared memory)."""
    from triton.compiler import ASTSource

    if not hasattr(kernel, "params"):  # Triton's interpreter (TRITON_INTERPRET) wraps kernels otherwise
        raise ValueError(f"{getattr(kernel, '__name__', kernel)}: an interpreted kernel; compile ahead of time "
                         "in a process without TRITON_INTERPRET, before any kernel module is imported")
    names = list(kernel.arg_names)
    given = [*types, *constants]
    unknown = sorted(set(given) - set(names))
    twice = sorted(set(types) & set(constants))
    if unknown or twice:
        raise ValueError(f"{kernel.__name__}: unknown parameters {unknown}, given twice {twice}")
    values = {p.name: p.default for p in kernel.params
              if p.is_constexpr and p.default is not inspect.Parameter.empty}
    values.update(constants)
    missing = [name for name in names if name not in types and name not in values]
    if missing:
        raise ValueError(f"{kernel.__name__}: no type or constant for {missing}")
    signature = {name: types.get(name, "constexpr") for name in names}
    return ASTSource(fn=kernel, signature=signature,
                     constexprs={(names.index(name),): value for name, value in values.items()},
                     attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})


def compile_for(kernel: Any, arch: int, types: dict[str, str], constants: dict[str, Any],
                aligned: Iterable[str] = (), **options: Any):
    """``kernel_source`` compiled for CUDA compute capability ``arch`` (90: H100 / H200, 87: Jetson
    Orin) with Triton's compile ``options`` (``num_warps``, ``num_stages``, ``launch_pdl``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile

    return compile(kernel_source(kernel, types, constants, aligned), target=GPUTarget("cuda", arch, 32),
                   options=options)


def cuda_tool(cubin: bytes, tool: str, *options: str) -> str:
    """What one of the CUDA tools that ship with Triton (``nvdisasm``, ``cuobjdump``) prints for
    ``cubin``, run with ``options`` on a temporary copy of it."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        return subprocess.run([str(path), *options, handle.name], capture_output=True, text=True, check=True,
                              timeout=300).stdout
    finally:
        os.unlink(handle.name)


def resource_usage(compiled: Any) -> dict[str, int]:
    """What ``compile_for``'s kernel takes per thread and block, as ``cuobjdump -res-usage`` reads
    its cubin: ``REG`` (registers per thread), ``STACK`` (bytes of stack, where registers spilled),
    ``SHARED`` and the rest. Why: Triton fills in the register count only when a GPU loads the
    kernel, and registers and a register cap (``maxnreg``) are checked here without one."""
    import re

    report = cuda_tool(compiled.asm["cubin"], "cuobjdump", "-res-usage")
    function = report.split(" Function ", 1)[-1]
    usage = {name: int(value) for name, value in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", function)}
    if "REG" not in usage or "STACK" not in usage:
        raise RuntimeError(f"cuobjdump -res-usage named no registers or stack: {report.strip()[-500:]}")
    return usage
