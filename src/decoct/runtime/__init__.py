"""The bottom layer: what every stage uses and no stage defines (no knowledge of any method)."""
