"""Lesson 46: rectified sparse attention, pooled compensation of the blocks a sparse mask drops (P18)."""
