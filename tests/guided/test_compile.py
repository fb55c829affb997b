"""torch.compile of a patched denoiser: inductor matches the uncompiled patch; a counting backend shows the patch
traced without recompiling on a rerun, at most one graph per batch layout, and disable unwrapping the compiled
module."""

from __future__ import annotations

import pytest
import torch

import headpag
from support import models as M
from support.checks import MIN_EFFECT, close, effect, patched, with_plain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_compile_inductor_matches_uncompiled(fresh_dynamo):
    """Enable first, then compile the patched denoiser. One small run (one layer, one step): inductor's first,
    cold-cache compile dominates the test's time."""
    pipe, inputs, plain = with_plain("sd3", dict(num_layers=1), steps=1)
    with patched(pipe, "fused", "0:0,0:2", scale=3.0):
        expected = M.run(pipe, inputs)
        pipe.transformer = torch.compile(pipe.transformer, backend="inductor")
        out = M.run(pipe, inputs)
    assert effect(expected, plain) > MIN_EFFECT
    close(out, expected, "compile")


@pytest.fixture(scope="module")
def compiled_sd3_counts():
    """A 4-step SD3 run with interval (0, 0.5) (steps 0-1 fork, 2-3 do not) through a counting backend."""
    torch._dynamo.reset()
    pipe, inputs, plain = with_plain("sd3", dict(num_layers=2), steps=4)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    try:
        with patched(pipe, "fused", "1:0,1:2", scale=3.0, interval=(0.0, 0.5)):  # disabled however this ends
            expected = M.run(pipe, inputs)
            pipe.transformer = torch.compile(pipe.transformer, backend=backend)
            out = M.run(pipe, inputs)
            first = list(graphs)
            again = M.run(pipe, inputs)
            rerun = list(graphs)
            headpag.disable(pipe)  # pipe.transformer is the compiled wrapper: disable unwraps it
            after = M.run(pipe, inputs)  # guards on the removed hooks fail: recompiled without them
    finally:
        torch._dynamo.reset()
    return dict(plain=plain, expected=expected, out=out, again=again, after=after, first=first, rerun=rerun)


def test_compile_traces_the_patch_without_recompiling_on_rerun(compiled_sd3_counts):
    c = compiled_sd3_counts
    close(c["out"], c["expected"], "compile")
    close(c["again"], c["expected"], "compile")
    assert c["rerun"] == c["first"], "a second identical run compiled again"
    assert effect(c["expected"], c["plain"]) > MIN_EFFECT
    close(c["after"], c["plain"], "compile", "compiled pipeline after disable")


def test_compile_at_most_two_graphs(compiled_sd3_counts):
    """One graph per batch layout (fork / no fork), not one per step, and no graph break splitting the model
    (headpag's host-side decisions run outside the graph, under torch.compiler.disable)."""
    assert len(compiled_sd3_counts["first"]) <= 2, f"graphs compiled (node counts): {compiled_sd3_counts['first']}"
