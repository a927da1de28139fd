"""Lesson 12: mixture-of-head attention (MoH), P04."""
