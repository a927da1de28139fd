"""Lesson 40: generalized neighborhood attention, sliding, strided and blocked windows, P21."""
