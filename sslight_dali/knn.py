"""Weighted k-NN classification on L2-normalised backbone features (k 20, T 0.07).

Two protocols: `val_loo`, the reference's per-epoch monitor (leave-one-out on the val set itself,
cheap, but not comparable with published kNN numbers) and `train_val` (a train-set feature bank,
val queries: the standard DINO protocol).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import build_eval_loader
from .runtime import world_size


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader, device: torch.device,
                     autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (not normalised) and labels for every sample of `loader`, ordered by sample index
    and gathered over ranks.
    `autocast_dtype` (e.g. bf16, as the training run) or None for full precision."""
    was_training = backbone.training
    backbone.eval()
    feats, labels, indices = [], [], []
    for images, y, idx in loader:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            f = backbone(images.to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(y.to(device))
        indices.append(idx.to(device))
    backbone.train(was_training)
    feats, labels, indices = torch.cat(feats), torch.cat(labels), torch.cat(indices)
    if world_size() > 1:
        feats, labels, indices = (_all_gather_varlen(t) for t in (feats, labels, indices))
    # Sharded readers may pad with repeats: keep one row per sample index.
    order = torch.argsort(indices)
    indices, feats, labels = indices[order], feats[order], labels[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    return feats[keep], labels[keep]


def knn_evaluate(cfg, backbone: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None = None,
                 rank: int = 0, world_size: int = 1, channels_last: bool = True):
    """kNN of `backbone` under cfg.eval.knn_mode. Returns (knn_classify's result, val features, val labels)."""
    def features(split):
        loader = build_eval_loader(cfg, split=split, rank=rank, world_size=world_size, channels_last=channels_last)
        return extract_features(backbone, loader, device, autocast_dtype)

    vf, vl = features(cfg.data.val_split)
    k, t = cfg.eval.knn_k, cfg.eval.knn_t
    if cfg.eval.knn_mode == "train_val":
        tf, tl = features(cfg.data.train_split)
        return knn_classify(tf, tl, vf, vl, k, t), vf, vl
    return knn_classify(vf, vl, vf, vl, k, t, leave_one_out=True), vf, vl


def _all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


@torch.no_grad()
def knn_classify(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, leave_one_out: bool = False, chunk: int = 1024) -> dict:
    """Top-1/top-5 (%) of a temperature-weighted vote over the k nearest bank rows (cosine similarity).

    With leave_one_out, queries are the bank itself and each query's own row is excluded.
    """
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    num_classes = int(torch.max(bank_labels.max(), query_labels.max()).item()) + 1
    k_eff = min(k, bank.shape[0] - int(leave_one_out))
    top1 = top5 = 0
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]
        sim = q @ bank.T
        if leave_one_out:
            rows = torch.arange(q.shape[0], device=q.device)
            sim[rows, rows + start] = -float("inf")
        w, nn_idx = sim.topk(k_eff, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[nn_idx], (w / temperature).exp())
        pred = votes.topk(min(5, num_classes), dim=1).indices
        truth = query_labels[start:start + chunk, None]
        top1 += (pred[:, :1] == truth).any(1).sum().item()
        top5 += (pred == truth).any(1).sum().item()
    n = queries.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "k": k_eff, "n": n}
