"""The Triton sparse decoder (a GPU's gather) checked without a GPU: its cases run on the CPU in Triton's interpreter,
in a pytest process of their own (TRITON_INTERPRET must be set before triton is imported), and its kernels compile
for a Hopper GPU (H100, H200) with the ptxas that Triton ships."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_gather_cases.py")


@pytest.mark.slow
def test_the_triton_gather_equals_the_dense_decoder_in_values_and_gradients():
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", str(CASES)],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "\n9 passed" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_kernels_compile_for_a_hopper_gpu(dtype):
    """Compiled as training launches them (the weight, codes and output in bfloat16 under autocast, or in float32)
    to a cubin for sm_90, which catches what the interpreter lets pass (types, loop bounds)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from clt_explorer.model import triton_gather as kernels

    index = "*i64"
    pointers = {kernels._gather_rows: {"weight": f"*{dtype}", "indices": index, "values": f"*{dtype}",
                                       "out": f"*{dtype}"},
                kernels._values_gradient: {"weight": f"*{dtype}", "indices": index, "grad_out": f"*{dtype}",
                                           "partial": "*fp32"},
                kernels._weight_gradient: {"starts": index, "tokens": index, "scales": f"*{dtype}",
                                           "grad_out": f"*{dtype}", "grad_weight": f"*{dtype}"}}
    blocks = {kernels._gather_rows: kernels.GATHER_BLOCKS, kernels._values_gradient: kernels.VALUES_GRADIENT_BLOCKS,
              kernels._weight_gradient: kernels.WEIGHT_GRADIENT_BLOCKS}
    for kernel, types in pointers.items():
        assert set(types) < set(kernel.arg_names)
        signature = {name: "constexpr" if name in blocks[kernel] else types.get(name, "i32")
                     for name in kernel.arg_names}
        constants = {(kernel.arg_names.index(name),): size for name, size in blocks[kernel].items()}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"][:4] == b"\x7fELF", kernel.fn.__name__
