"""Lesson 31: agent attention, P06."""
