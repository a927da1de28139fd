"""Lesson 30: linear attention and Flowformer, P29."""
