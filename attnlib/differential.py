"""Lesson 13: differential and grouped differential attention, P05."""
