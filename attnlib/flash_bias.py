"""Lesson 50: FlashBias, attention with a low-rank bias, P07."""
