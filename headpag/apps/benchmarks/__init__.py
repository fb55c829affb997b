"""headpag's performance report (``headpag bench``) and the suites behind it.

- ``meta_flops``: FLOPs of one guided step on the meta device, contenders and the theoretical minimum;
- ``full_size``: the full-size models (SD3-medium, FLUX.1-dev, SD1.5, SDXL) and their head sets;
- ``roofline``: the H100 time projection from FLOPs and bytes;
- ``timing``: timed rounds and their statistics;
- ``guided_step``: wall clock of one guided pipeline step per contender (CPU and CUDA settings);
- ``kernel_sweep``: ``perturbed_attention`` against SDPA (CPU and CUDA cases);
- ``refresh``: ``refresh = k`` per sampling run: FLOPs, CPU run times, digits quality;
- ``machine``: what the numbers depend on;
- ``report``: the command: runs the sections, writes JSON and Markdown.

``bench/`` (pytest-benchmark) imports the same cases from here.
"""

SECTIONS = ("flops", "cpu", "refresh", "gpu")
