"""Lesson 10: grouped-query attention and key-driven grouping (KDGQA, DGQA, PGQA), P11."""
