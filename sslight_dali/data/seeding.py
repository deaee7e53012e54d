"""Seeds shared by both backends."""


def mix_seed(seed: int, rank: int) -> int:
    """Per-rank augmentation seed: different views on every rank, reproducible for a given seed."""
    return (seed * 1_000_003 + rank * 7919 + 1) % (2 ** 31 - 1)
