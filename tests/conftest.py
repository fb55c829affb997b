"""Shared setup of every test folder: the kernel tests' interpreter mode and tolerances, and the fixtures used by
more than one test file (helpers shared as code live in tests/support).

``TRITON_INTERPRET=1`` must be in the environment before triton is first imported (``triton.jit`` decides at
decoration time whether a kernel is interpreted), so it is set here, before anything imports torch, triton or
headpag. Kernels then run on CPU tensors in Triton's interpreter.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402

# tests/support is imported as the package ``support`` from any
# test folder; make that work under any pytest --import-mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# A plugin or an earlier import that loaded the kernel module without the variable would compile instead of
# interpret; fail loudly rather than run the kernel tests against the wrong thing.
_kernel_module = sys.modules.get("headpag.kernels.triton_kernel")
if _kernel_module is not None and type(_kernel_module._perturbed_attention_fwd).__name__ != "InterpretedFunction":
    raise RuntimeError("headpag.kernels.triton_kernel was imported before tests/conftest.py set TRITON_INTERPRET=1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
    """Tiny models: one torch thread avoids oversubscribing a small shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """A clean torch._dynamo state before and after the test (no compiled graphs or guards carried over)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def tiny_clip_dirs(tmp_path_factory):
    """``(model_dir, processor_dir)`` of the tiny random CLIP of tests/support/tiny_clip.py, written once."""
    from support.tiny_clip import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
