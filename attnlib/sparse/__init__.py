"""Part 4, sparse and local attention (lessons 40-47).

:mod:`~attnlib.sparse.block_sparse` (the block layout and tile bounds every lesson of the part uses, and
:func:`~attnlib.sparse.block_sparse.sparse_attention`, which runs a mask through the reference or the kernel),
:mod:`~attnlib.sparse.neighborhood` (40), :mod:`~attnlib.sparse.radial` (41), :mod:`~attnlib.sparse.freeswim` (42),
:mod:`~attnlib.sparse.shifted_sparse` (43), :mod:`~attnlib.sparse.hip` (44), :mod:`~attnlib.sparse.dynamic_mask`
(45), :mod:`~attnlib.sparse.rectified_sparse` (46), :mod:`~attnlib.sparse.flux_routing` (47).
"""
