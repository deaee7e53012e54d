"""The reference backend: the same recipe with PIL/torchvision transforms in DataLoader workers.

This is what the SSLight reference runs (src/data/transforms.py:45-111) and the yardstick for the
parity tests and the benchmarks. All randomness comes from torch's RNG (blur and solarize included),
which DataLoader seeds per worker from the loader's generator, so a fixed seed gives fixed views.

Resume is at epoch + step granularity: the sampler is re-seeded for the epoch and skips the batches
already consumed, so the sample order is exact; the random views of the remaining batches differ from
an uninterrupted run (worker RNG streams restart).
"""
from __future__ import annotations

import io
import logging
import signal
from typing import Iterator

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from ..augment import OPS
from ..config import Augment, Recipe, ViewSpec
from ..runtime import torch_device
from .base import LoaderPosition, mix_seed, to_device, too_few_samples
from .sources import DataError, Samples

log = logging.getLogger(__name__)

BICUBIC = T.InterpolationMode.BICUBIC


class ViewTransform:
    """One view of the recipe on a PIL image: the crop, each op of the table (sslight_dali/augment.py)
    in order, normalize. `record`, if given, receives the parameters drawn."""

    def __init__(self, view: ViewSpec, aug: Augment):
        self.view, self.aug = view, aug
        self.interp = BICUBIC if aug.interpolation == "bicubic" else T.InterpolationMode.BILINEAR

    def __call__(self, img: Image.Image, record: dict | None = None) -> torch.Tensor:
        aug, view, rec = self.aug, self.view, {}
        i, j, h, w = T.RandomResizedCrop.get_params(img, list(view.scale), list(aug.ratio))
        rec.update(crop_y=i, crop_x=j, crop_h=h, crop_w=w, image_h=img.height, image_w=img.width)
        img = F.resized_crop(img, i, j, h, w, [view.size, view.size], self.interp)
        for op in OPS:
            img = op.torch(img, view, aug, rec)
        if record is not None:
            record.update(rec)
        return F.normalize(F.to_tensor(img), aug.mean, aug.std)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as the DALI decoder makes it: 16-bit samples scaled by 255/65535 and rounded (PIL's
    own conversion clips them to 255 instead); EXIF orientation ignored (as DALI is told to)."""
    if im.mode.startswith("I;16"):
        v = np.asarray(im).astype(np.uint32)
        im = Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), "L")
    return im.convert("RGB")  # grayscale, palette, CMYK and RGBA all become RGB


def load_rgb(samples: Samples, i: int) -> Image.Image:
    with Image.open(io.BytesIO(samples.read_bytes(i))) as im:
        return to_rgb(im)


def load_or_replace(samples: Samples, i: int, replace_bad: bool) -> tuple[Image.Image, int]:
    """(image, index) of sample i, decoded at run time. A file that passed the up-front check but does
    not decode now (changed since, or damage only a full decode finds) stops the run with a DataError
    naming it; with replace_bad (data.skip_bad_files) the next sample that decodes takes its place,
    logged with the count of files replaced so far (per loader process)."""
    for k in range(len(samples)):
        j = (i + k) % len(samples)
        try:
            img = load_rgb(samples, j)
        except Exception as e:  # PIL raises many types for bad data
            if not replace_bad:
                raise DataError(f"cannot decode {samples.files[j]} ({type(e).__name__}: {e}); it passed the up-front "
                                "check, so it changed since or is damaged where only a full decode sees it; remove "
                                "it, or set data.skip_bad_files=true to replace such files by others") from None
            _REPLACED.add(samples.files[j])
            continue
        if k:
            log.warning("data.skip_bad_files: %s does not decode; replaced by %s (%d file(s) replaced so far)",
                        samples.files[i], samples.files[j], len(_REPLACED))
        return img, j
    raise DataError(f"no image under {samples.root} decodes")


_REPLACED: set[str] = set()  # files replaced at run time in this process


class MultiViewDataset(torch.utils.data.Dataset):
    def __init__(self, samples: Samples, recipe: Recipe, replace_bad: bool = False):
        self.samples, self.replace_bad = samples, replace_bad
        self.views = [ViewTransform(v, recipe.augment) for v in recipe.views()]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img, i = load_or_replace(self.samples, i, self.replace_bad)
        return [t(img) for t in self.views], self.samples.labels[i], i


class EvalDataset(torch.utils.data.Dataset):
    def __init__(self, samples: Samples, resize: int, crop: int, mean, std, replace_bad: bool = False):
        self.samples, self.replace_bad = samples, replace_bad
        self.transform = T.Compose([T.Resize(resize, interpolation=BICUBIC), T.CenterCrop(crop), T.ToTensor(),
                                    T.Normalize(mean, std)])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img, i = load_or_replace(self.samples, i, self.replace_bad)
        return self.transform(img), self.samples.labels[i], i


class ShardSampler(torch.utils.data.Sampler):
    """DistributedSampler semantics (pad by wrapping, rank::world) plus a start offset for resume."""

    def __init__(self, n: int, rank: int, world_size: int, seed: int, shuffle: bool, pad: bool):
        self.n, self.rank, self.world, self.seed, self.shuffle, self.pad = n, rank, world_size, seed, shuffle, pad
        self.epoch, self.start = 0, 0

    def indices(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        if self.pad:
            total = -(-self.n // self.world) * self.world
            order += order[: total - self.n]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self):
        return len(self.indices()) - self.start


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT (Ctrl-C reaches the whole process group) and SIGUSR1 to the trainer,
    which finishes its step and saves; a worker killed by them would end the run before the checkpoint
    is written. SIGTERM stays: the DataLoader uses it to stop a worker that does not exit by itself."""
    for s in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


class TorchLoader(LoaderPosition):
    """Same interface as the DALI loaders, on a torch DataLoader."""

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, channels_last: bool,
                 dtype: torch.dtype, num_workers: int, seed: int, device: str, shuffle: bool, drop_last: bool,
                 classes: list[str]):
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.channels_last, self.dtype, self.num_workers, self.seed = channels_last, dtype, num_workers, seed
        self.device, self.drop_last = device, drop_last
        self.classes, self.num_classes, self.num_samples = classes, len(classes), len(dataset)
        # Eval (no drop-last) shards without padding, so each sample is seen exactly once.
        self.sampler = ShardSampler(len(dataset), rank, world_size, seed, shuffle, pad=drop_last)
        n = len(self.sampler.indices())
        if drop_last and n < batch_size:
            raise DataError(too_few_samples(len(dataset), world_size, batch_size, dataset.samples.root))
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._torch_device = torch_device(device)
        self._next_epoch, self._step = 0, 0

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return to_device(t, self._torch_device).to(dtype=self.dtype, memory_format=fmt)

    def _dataloader(self) -> torch.utils.data.DataLoader:
        # Built once with persistent workers: restarting them every epoch cost more than half the
        # throughput on small datasets. The sampler is re-read at each epoch's iter().
        if getattr(self, "_dl", None) is None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.rank))
            self._dl = torch.utils.data.DataLoader(
                self.dataset, self.batch_size, sampler=self.sampler, num_workers=self.num_workers,
                drop_last=self.drop_last, generator=g, pin_memory=self._torch_device.type == "cuda",
                persistent_workers=self.num_workers > 0, worker_init_fn=_ignore_stop_signals)
        return self._dl

    def _batches(self, epoch: int):
        if epoch != self._next_epoch:
            self._step = 0
        self.sampler.epoch, self.sampler.start = epoch, self._step * self.batch_size
        try:
            for batch in self._dataloader():
                self._step += 1
                yield batch
        except DataError as e:  # from a worker: torch wraps the message in the worker's traceback
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        self._next_epoch, self._step = epoch + 1, 0

    def epoch(self, epoch: int):
        for x, labels, index in self._batches(epoch):
            x = [self._to(v) for v in x] if isinstance(x, list) else self._to(x)
            yield x, to_device(labels, self._torch_device), to_device(index, self._torch_device)

    def state_dict(self) -> dict:
        return self._position()

    def load_state_dict(self, state: dict) -> None:
        self._restore_position(state)
