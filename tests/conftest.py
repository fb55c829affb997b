"""Shared setup for the kernel tests.

``TRITON_INTERPRET=1`` must be in the environment before triton is first imported (``triton.jit`` decides at
decoration time whether a kernel is interpreted), so it is set here, before anything imports torch, triton or
headpag. Kernels then run on CPU tensors in Triton's interpreter.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402

# The helpers in tests/tolerances.py are imported by name; make that work under any pytest --import-mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# A plugin or an earlier import that loaded the kernel module without the variable would compile instead of
# interpret; fail loudly rather than run the kernel tests against the wrong thing.
_kernel_module = sys.modules.get("headpag.kernels.triton_kernel")
if _kernel_module is not None and type(_kernel_module._perturbed_attention_fwd).__name__ != "InterpretedFunction":
    raise RuntimeError("headpag.kernels.triton_kernel was imported before tests/conftest.py set TRITON_INTERPRET=1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tolerances import TOLERANCES, QKV_VARIANTS, make_qkv, tolerance  # noqa: E402,F401


@pytest.fixture
def tolerances():
    """``{dtype: (atol, rtol)}`` for comparisons against the float64 reference (tests/tolerances.py)."""
    return TOLERANCES


@pytest.fixture(name="make_qkv")
def make_qkv_fixture():
    """The q, k, v factory of tests/tolerances.py (random tensors in a layout, incl. non-contiguous views)."""
    return make_qkv


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 Triton dots use tf32 when torch.backends.cuda.matmul.allow_tf32 is set; the fp32 tolerances assume
    full-precision dots, so keep it off (and restore whatever a test set)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is faster than two on a shared 2-core CPU (no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
