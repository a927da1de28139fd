"""Part 1, heads: who computes what (lessons 10-14).

:mod:`~attnlib.heads.grouped_query` (10, grouped-query attention and key-driven grouping),
:mod:`~attnlib.heads.decoupled_heads` (11), :mod:`~attnlib.heads.mixture_of_heads` (12),
:mod:`~attnlib.heads.differential` (13), :mod:`~attnlib.heads.head_guidance` (14).
"""
