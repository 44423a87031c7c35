"""Optional GPU speed: Triton kernels and inductor graph passes. The model computes the same without
them: deleting this folder changes speed (and float rounding), never what is computed.

- ``short_attention``: causal attention of many short sequences (the local model's patches);
  ``megabyte.attention``'s "kernel" backend.
- ``relu_backward``: the ReLU's backward inside the matrix product of its input gradient.
- ``inductor_passes``: graph passes that torch.compile adds (``megabyte.parallelize.inductor_options``),
  one of which puts ``relu_backward`` into compiled training graphs.
"""
