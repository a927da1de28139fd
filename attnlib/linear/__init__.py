"""Part 3, linear-time attention (lessons 30-32).

:mod:`~attnlib.linear.linear_attention` (30, linear attention and Flowformer), :mod:`~attnlib.linear.agent_attention`
(31), :mod:`~attnlib.linear.token_aggregation` (32, CATANet).
"""
