"""Lesson 45: dynamic mask attention, content-aware key selection from the values (P15)."""
