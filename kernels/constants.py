"""Names every module of ``headpag.kernels`` shares, defined once. Pure Python: imports neither torch nor triton.

The *codes* classify each (batch row, head) pair by its coefficient ``u``; they decide the work done:

    PLAIN    = 0   u == 0        plain attention
    SOFT     = 1   0 < u < 1     attention and identity map blended
    IDENTITY = 2   u == 1        identity map only (joint mode: no q k^T at all)

The public keyword ``plan=`` of ``perturbed_attention`` takes these codes.
"""

PLAIN, SOFT, IDENTITY = 0, 1, 2
CODES = (PLAIN, SOFT, IDENTITY)

# What the perturbed map P is: "joint", the identity over the whole sequence; "image", a softmax in which an image
# query sees only the text keys and its own key.
MODES = ("joint", "image")
