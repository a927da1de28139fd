"""Lesson 11: decoupled-head attention, fusing the heads of a checkpoint (DHA), P36."""
