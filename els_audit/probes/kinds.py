"""The declared vocabulary of canonical op kinds.

Every canonicaliser returns one of these kinds; the receptive-field and equivariance rule
tables accept only these keys.  Each kind is either

- *modelled*: it has a receptive-field rule and an equivariance rule
  (``tests/probes/test_kinds.py`` checks both tables against this list);
- *data-free*: it carries no image data on to its output (graph inputs, parameters, shape
  queries, tensor factories), so no rule is needed; or
- *unmodelled*: declared here with the reason; on the image path it makes the analysis
  partial and is treated as mixing every position (never as local).
"""

from __future__ import annotations

#: kind -> what it covers.  Modelled kinds: both rule tables must have a rule.
MODELLED = {
    "conv": "convolution (module, functional or aten; any padding mode)",
    "conv_transpose": "transposed convolution",
    "pool": "max / average pooling",
    "adaptive_pool": "adaptive pooling (global or by an integer factor)",
    "upsample": "nearest / linear / cubic interpolation",
    "pixel_shuffle": "depth-to-space (PixelShuffle, or its reshape / permute / einops form)",
    "pixel_unshuffle": "space-to-depth (PixelUnshuffle, or its reshape / permute / einops form)",
    "pad": "explicit padding",
    "roll": "circular shift",
    "pointwise": "elementwise ops, activations, dropout, dtype casts",
    "batchnorm": "batch normalisation (running or batch statistics)",
    "norm": "group / layer / instance / RMS normalisation",
    "softmax": "softmax and log-softmax",
    "reduce": "reductions (mean, var, max, var_mean ...), single- or multi-output",
    "reshape": "view / reshape / flatten / unflatten / squeeze",
    "permute": "permute / transpose / movedim",
    "expand": "expand / broadcast_to",
    "repeat": "repeat / tile",
    "index": "basic indexing and slicing",
    "split": "split / chunk / unbind",
    "cat": "concatenation",
    "stack": "stacking",
    "einsum": "contractions: Linear, matmul, bmm, einsum",
    "attention": "scaled dot-product and multi-head attention",
    "select_output": "picking one output of a multi-output op (getitem)",
}

#: kind -> why it carries no image data (no rule needed).
DATA_FREE = {
    "image": "the image input itself (the start of every path)",
    "input": "another graph input (time, label)",
    "param": "a parameter or buffer",
    "output": "the graph's output node",
    "meta": "shape queries, asserts, guards: no tensor comes out",
    "factory": "tensor factories (zeros_like, arange ...): shape and dtype only",
}

#: kind -> why no rule models it (on the image path: partial, treated as global).
UNMODELLED = {
    "gather": "indexing with tensors: which positions are read depends on data",
    "embedding": "table lookup with image-derived indices",
    "unknown": "no canonical rule for this op (or the rule failed on this call)",
}

#: every canonical kind
OP_KINDS = frozenset(MODELLED) | frozenset(DATA_FREE) | frozenset(UNMODELLED)
