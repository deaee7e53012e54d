"""What the DALI and the torchvision loaders share: seeding and the epoch/step position."""


def mix_seed(seed: int, rank: int) -> int:
    """Per-rank augmentation seed: different views on every rank, reproducible for a given seed."""
    return (seed * 1_000_003 + rank * 7919 + 1) % (2 ** 31 - 1)


def too_few_samples(n: int, world_size: int, batch_size: int, root: str) -> str:
    """The one-line error for a split smaller than one batch per process."""
    per_rank = -(-n // world_size)
    return (f"{n} usable images under {root} over {world_size} process(es) give {per_rank} per process, fewer than "
            f"one batch (train.batch_size={batch_size}): lower train.batch_size or add images")


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
        from .sources import DataError
        if state["num_samples"] != self.num_samples:
            raise DataError(f"the checkpoint was written on {state['num_samples']} images and the data now has "
                            f"{self.num_samples}: the data set changed since. Resume needs the "
                            "same images; to train on the new set, start a new train.output_dir")
        for key in ("world_size", "rank"):
            if state[key] != getattr(self, key):
                raise DataError(f"the loader state was saved with {key}={state[key]} and this process has "
                                f"{getattr(self, key)}: resume with the same number of processes")
        self._next_epoch, self._step = state["epoch"], state["step"]
