"""Using qswap with fairseq's own entry points, data directories and checkpoints.

Everything here imports fairseq; ``import qswap`` does not import this package.
"""
