"""Lesson 41: radial attention, a static mask whose band shrinks with temporal distance (P39)."""
