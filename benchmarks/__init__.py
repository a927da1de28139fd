"""benchmarks: the course's GPU benchmarks and their dated results (the ``*.json`` files beside this package).

One module per kernel family, each a command: ``python -m benchmarks.flash`` (lessons 01 and 13),
``benchmarks.linear`` (30), ``benchmarks.agent`` (31), ``benchmarks.sparse`` (40-46), ``benchmarks.bias`` (50).
They sit above ``kernels`` and ``attnlib`` (they compare a kernel with the library's reference and with
PyTorch's SDPA); neither package imports them. :mod:`benchmarks.common` holds what they share.
"""
