"""Lesson 44: HiP attention, hierarchical pruning of key blocks by tree search (P27)."""
