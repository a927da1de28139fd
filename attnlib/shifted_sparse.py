"""Lesson 43: shifted sparse attention, sink tokens and heavy-hitter eviction, P37."""
