"""Block-sparse attention: block lists from masks, the layout the block-sparse kernel follows (part 4)."""
