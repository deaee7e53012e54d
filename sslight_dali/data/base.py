"""What the DALI and the torchvision loaders share: seeding and the epoch/step position."""


def mix_seed(seed: int, rank: int) -> int:
    """Per-rank augmentation seed: different views on every rank, reproducible for a given seed."""
    return (seed * 1_000_003 + rank * 7919 + 1) % (2 ** 31 - 1)


class LoaderPosition:
    """Epoch/step bookkeeping and its state. Subclasses set steps_per_epoch, num_samples, rank,
    world_size and define epoch(e)."""
    _next_epoch = 0
    _step = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        return self.epoch(self._next_epoch)

    def _position(self) -> dict:
        return {"epoch": self._next_epoch, "step": self._step, "num_samples": self.num_samples,
                "world_size": self.world_size, "rank": self.rank}

    def _restore_position(self, state: dict) -> None:
        for key in ("num_samples", "world_size", "rank"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this loader has {getattr(self, key)}")
        self._next_epoch, self._step = state["epoch"], state["step"]
