"""DALI loaders for PyTorch: multi-view training batches and evaluation batches.

Epochs: the reader reshuffles the data set after every epoch with a seed all ranks share, and each
rank reads its own contiguous shard of that permutation (the list handed to the reader is
pre-shuffled with the same seed, since the reader's own shuffle starts after epoch 0). With drop_last
every shard runs the full batches of the shortest, so every rank runs `steps_per_epoch` steps.
WebDataset tars are read in a reshuffled tar order with a per-rank shuffle buffer; each sample's
`source_info` is mapped back to its index in `Samples` (`_sample_index`).

Resume: `state_dict()` holds each pipeline's DALI checkpoint (prefetched batches accounted for) and
the epoch and step, so the next batch after `load_state_dict()` is bit-identical.

`pipelines` = k > 1 (training): DALI runs its CPU operators one at a time, each split over the
pipeline's threads, so k pipelines with num_threads/k threads each, taking turns batch by batch, keep
the cores busy. Pipeline j of rank r reads shard r*k + j of world*k, with its own seed and checkpoint.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import weakref

import numpy as np
import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from ..config import Recipe
from ..runtime import torch_device
from .base import LoaderPosition, mix_seed, to_device, too_few_samples
from .dali_views import READER, ReaderSpec, eval_pipeline, train_pipeline
from .sources import DataError, PipelinesDoNotFit, Samples, find_bad_samples, write_wds_index

log = logging.getLogger(__name__)


class _DaliLoader(LoaderPosition):
    """Shared iterator plumbing: build, iterate one epoch, checkpoint."""

    def __init__(self, samples: Samples, batch_size: int, device: str, rank: int, world_size: int,
                 channels_last: bool, dtype: torch.dtype, num_threads: int, prefetch: int, seed: int,
                 shuffle: bool, drop_last: bool, pipelines: int = 1):
        self.samples, self.batch_size, self.device = samples, batch_size, device
        self.rank, self.world_size, self.channels_last, self.dtype = rank, world_size, channels_last, dtype
        self.num_threads, self.prefetch, self.seed = num_threads, prefetch, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.classes = samples.classes
        self.num_classes = len(samples.classes)
        self.num_samples = len(samples)
        if pipelines > 1 and not drop_last:
            raise ValueError("several DALI pipelines need drop_last (every pipeline runs the same number of steps)")
        if pipelines > num_threads:
            raise PipelinesDoNotFit(f"data.pipelines={pipelines} needs at least as many data.num_threads (got {num_threads}): "
                            "each pipeline has num_threads/pipelines threads")
        self.pipelines = pipelines
        # Shards differ in length by at most one sample; with drop_last DALI runs every shard for the
        # shortest shard's full batches (floor), so every rank and pipeline runs the same number of steps.
        shard = self.num_samples // (world_size * pipelines)
        if drop_last and shard < batch_size:
            if pipelines > 1:
                raise PipelinesDoNotFit(f"{self.num_samples} images over {world_size} process(es) x data.pipelines={pipelines} "
                                f"give {shard} per pipeline, fewer than one batch (train.batch_size={batch_size}): "
                                "use data.pipelines=1, lower train.batch_size or add images")
            raise DataError(too_few_samples(self.num_samples, world_size, batch_size, samples.root))
        self.steps_per_epoch = (pipelines * (shard // batch_size) if drop_last
                                else -(-self._own_shard_len() // batch_size))
        self._torch_device = torch_device(device)
        self._labels = torch.tensor(samples.labels, dtype=torch.int64)  # looked up on the CPU, beside the index
        self._wds = self._webdataset_index() if samples.storage == "tar" else None
        self._next_epoch, self._step = 0, 0
        self._its = self._build(checkpoints=None)

    # -- subclasses define the graph ---------------------------------------------------------
    def _pipeline(self, reader: ReaderSpec, **pipe_kwargs):
        raise NotImplementedError

    def _output_map(self) -> list[str]:
        raise NotImplementedError

    # -- plumbing ------------------------------------------------------------------------------
    def _own_shard_len(self) -> int:
        n, w, r = self.num_samples, self.world_size, self.rank
        return (r + 1) * n // w - r * n // w  # DALI's shard boundaries

    def _webdataset_index(self):
        """DALI index files for the tars, in a directory removed with this loader."""
        out = tempfile.mkdtemp(prefix="sslight_wds_")
        weakref.finalize(self, shutil.rmtree, out, ignore_errors=True)
        return write_wds_index(self.samples, out)

    def _reader(self, j: int = 0) -> ReaderSpec:
        """Pipeline j's reader (by the samples' storage, sslight_dali/data_formats.py): shard
        rank * pipelines + j of world_size * pipelines."""
        shard = dict(shard_id=self.rank * self.pipelines + j, num_shards=self.world_size * self.pipelines,
                     shuffle=self.shuffle, seed=self.seed)
        if self.samples.storage == "tar":
            tars, index_files = self._wds.tars, self._wds.index_files
            if self.shuffle:  # epoch 0 order; DALI reshuffles the tars from epoch 1 on
                order = np.random.default_rng(self.seed).permutation(len(tars))
                tars, index_files = [tars[i] for i in order], [index_files[i] for i in order]
            return ReaderSpec(files=tars, indices=[], storage="tar", index_files=index_files,
                              source_info_len=self._wds.info_len, **shard)
        order = np.arange(self.num_samples)
        if self.shuffle:
            order = np.random.default_rng(self.seed).permutation(self.num_samples)
        return ReaderSpec(files=[self.samples.files[i] for i in order], indices=order.tolist(), storage="files",
                          **shard)

    def _build(self, checkpoints: list[str] | None) -> list[DALIGenericIterator]:
        """One iterator per pipeline (see the module docstring); with one pipeline the seed is the
        rank's, as it always was."""
        k = self.pipelines
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        its = []
        for j in range(k):
            pipe = self._pipeline(
                self._reader(j), batch_size=self.batch_size, num_threads=self.num_threads // k,
                device_id=self._torch_device.index if self.device == "gpu" else None,
                seed=mix_seed(self.seed, self.rank * k + j), prefetch_queue_depth=self.prefetch,
                checkpoint=None if checkpoints is None else checkpoints[j])
            its.append(DALIGenericIterator(pipe, self._output_map(), reader_name=READER, last_batch_policy=policy,
                                           auto_reset=False, prepare_first_batch=False))
        return its

    def _batches(self, epoch: int):
        if epoch != self._next_epoch:
            log.warning("loader asked for epoch %d but its reader is at epoch %d; the sample order is that "
                        "of reader epoch %d (restore a state_dict for exact resume)", epoch, self._next_epoch,
                        self._next_epoch)
        steps, its = 0, self._its
        try:
            while True:
                try:
                    out = next(its[self._step % len(its)])  # the pipelines take turns
                except StopIteration:
                    break
                steps += 1
                self._step += 1
                yield out[0]
            # Every pipeline has the same number of batches: the others end here too.
            uneven = [next(it, None) is not None for it in its[1:]]
        except RuntimeError as e:  # the pipeline is dead after an operator error
            raise self._decode_error(e, epoch) from None
        if any(uneven):
            raise RuntimeError("the DALI pipelines of one loader ran different numbers of steps")
        for it in its:
            it.reset()
        expected = self.steps_per_epoch - (self._step - steps)
        if steps != expected:
            raise RuntimeError(f"DALI epoch ran {steps} steps, expected {expected}")
        self._next_epoch, self._step = epoch + 1, 0

    def _decode_error(self, e: RuntimeError, epoch: int) -> DataError:
        """DALI's error does not name the sample and the failed batch never arrives, so the files of
        this loader are checked again (threads; the up-front check, which knows what DALI cannot
        decode) to name the culprit."""
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((lines[k + 1] for k, ln in enumerate(lines[:-1]) if ln == "encountered:"),
                      lines[0] if lines else type(e).__name__)
        bad = find_bad_samples(self.samples, self.num_threads)
        if bad:
            named = "; ".join(f"{self.samples.files[i]}: {why}" for i, why in bad[:10])
            more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
            what = f"{len(bad)} file(s) no longer pass the file check: {named}{more}"
        else:
            what = "no file fails the file check now, so the culprit is not known"
        return DataError(f"DALI could not decode a sample in epoch {epoch} ({reason}); {what}. The DALI backend "
                         "cannot replace a sample once training runs (data.skip_bad_files works on the file "
                         "check at start): remove or fix the file and restart, or use data.backend=torchvision")

    def _images(self, t: torch.Tensor) -> torch.Tensor:
        # DALI writes HWC when channels_last is wanted: the permute is a zero-copy view whose strides
        # are exactly torch.channels_last. Otherwise DALI already wrote contiguous NCHW.
        if self.channels_last:
            t = t.permute(0, 3, 1, 2)
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def _sample_index(self, idx: torch.Tensor) -> torch.Tensor:
        if self.samples.storage == "files":  # the file reader's "label" output is the dataset index
            return idx.reshape(-1).to(torch.int64)
        # WebDataset: rows of zero-padded source_info bytes -> dataset index.
        rows = idx.cpu().numpy()
        try:
            return torch.tensor([self._wds.sample_of[bytes(r).rstrip(b"\0").decode()] for r in rows],
                                dtype=torch.int64)
        except KeyError as e:
            raise DataError(f"DALI's webdataset reader returned an unknown sample {e}; expected "
                            "'<tar>:<offset>:<member>' as listed in our index files") from None

    def _index_and_labels(self, idx: torch.Tensor):
        idx = self._sample_index(idx)  # the reader's output lives on the CPU
        both = to_device(torch.stack([self._labels[idx], idx]), self._torch_device)
        return both[0], both[1]

    def state_dict(self) -> dict:
        """Exact position: the DALI checkpoint of every pipeline (reader + RNG states, prefetch accounted
        for) and counters. One pipeline keeps the single-string form of earlier checkpoints."""
        ckpts = [it.checkpoints()[0] for it in self._its]
        return {"dali": ckpts[0] if len(ckpts) == 1 else ckpts, "pipelines": len(ckpts), **self._position()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("pipelines", 1)
        if saved != self.pipelines:
            raise DataError(f"the loader state was saved with data.pipelines={saved} and this run has "
                            f"{self.pipelines}: resume with data.pipelines={saved}")
        self._restore_position(state)
        ckpts = state["dali"]
        try:
            self._its = self._build(checkpoints=list(ckpts) if isinstance(ckpts, list) else [ckpts])
        except RuntimeError as e:  # DALI matches a checkpoint to the graph's operators by name
            reason = next((ln.strip() for ln in str(e).splitlines() if "recogni" in ln), type(e).__name__)
            raise DataError("the checkpoint's DALI loader state does not fit this version's view-sampling graph "
                            f"({reason}): it was written by another sslight-dali version; resume with that "
                            "version, or start a new train.output_dir") from None


class DaliTrainLoader(_DaliLoader):
    """Multi-view batches: `for views, labels, indices in loader.epoch(e)`."""

    def __init__(self, samples: Samples, recipe: Recipe, debug: bool = False, hw_decoder_load: float = 0.65,
                 drop_last: bool = True, **kw):
        self.recipe, self.debug, self.hw_decoder_load = recipe, debug, hw_decoder_load
        self.view_names = [v.name for v in recipe.views()]
        super().__init__(samples, shuffle=True, drop_last=drop_last, **kw)

    def _pipeline(self, reader, **kw):
        return train_pipeline(reader, self.recipe, self.device, self.channels_last, self.hw_decoder_load,
                              debug=self.debug, **kw)

    def _output_map(self):
        views = [f"view_{i}" for i in range(len(self.view_names))]
        return views + ["index"] + ([f"record_{i}" for i in range(len(views))] if self.debug else [])

    def epoch(self, epoch: int):
        """Yield (views, labels, indices) for one epoch: exactly steps_per_epoch batches.

        With debug=True each item also carries a list of per-view records [B, len(augment.record_fields())].
        """
        n = len(self.view_names)
        for out in self._batches(epoch):
            views = [self._images(out[f"view_{i}"]) for i in range(n)]
            labels, index = self._index_and_labels(out["index"])
            if self.debug:
                yield views, labels, index, [out[f"record_{i}"] for i in range(n)]
            else:
                yield views, labels, index


class DaliEvalLoader(_DaliLoader):
    """Resize + centre crop, every sample of this rank's shard once: `for images, labels, indices in loader`."""

    def __init__(self, samples: Samples, resize: int, crop: int, mean, std, hw_decoder_load: float = 0.65, **kw):
        self.resize, self.crop, self.mean, self.std, self.hw_decoder_load = resize, crop, mean, std, hw_decoder_load
        super().__init__(samples, shuffle=False, drop_last=False, **kw)

    def _pipeline(self, reader, **kw):
        return eval_pipeline(reader, self.resize, self.crop, self.mean, self.std, self.device, self.channels_last,
                             self.hw_decoder_load, **kw)

    def _output_map(self):
        return ["images", "index"]

    def epoch(self, epoch: int = 0):
        for out in self._batches(epoch):
            labels, index = self._index_and_labels(out["index"])
            yield self._images(out["images"]), labels, index
