"""Part 5, attention with bias (lesson 50).

:mod:`~attnlib.bias.flash_bias` (50, FlashBias: low-rank biases and the ALiBi factorisation).
"""
