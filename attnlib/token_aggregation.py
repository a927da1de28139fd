"""Lesson 32: content-aware token aggregation (CATANet), P13."""
