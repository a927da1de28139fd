"""Lesson 47: Flux attention, routing layers between full and sparse attention, P26."""
