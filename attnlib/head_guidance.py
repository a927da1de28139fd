"""Lesson 14: steering by heads, HeadHunter and SoftPAG, P08."""
