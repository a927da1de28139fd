"""Lesson 42: FreeSwim, inward sliding windows and the cross-attention override (P33)."""
