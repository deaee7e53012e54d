"""Weighted kNN against a plain re-computation, and the trainer's per-epoch evaluation record."""
import math

import torch

from sslight_dali.knn import knn_classify


def brute_force_top1(bank, bank_labels, queries, query_labels, k, t, leave_one_out):
    bank = [b / b.norm() for b in bank]
    hits = 0
    for qi, q in enumerate(queries):
        q = q / q.norm()
        sims = [(float(q @ b), j) for j, b in enumerate(bank) if not (leave_one_out and j == qi)]
        sims.sort(reverse=True)
        votes = {}
        for s, j in sims[:k]:
            votes[int(bank_labels[j])] = votes.get(int(bank_labels[j]), 0.0) + math.exp(s / t)
        hits += max(votes, key=votes.get) == int(query_labels[qi])
    return 100.0 * hits / len(queries)


def test_knn_matches_a_plain_recomputation():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g)
    labels = torch.arange(60) % 4
    feats = centers[labels] + 0.9 * torch.randn(60, 16, generator=g)
    queries_labels = torch.arange(25) % 4
    queries = centers[queries_labels] + 0.9 * torch.randn(25, 16, generator=g)
    for k, t in ((5, 0.07), (20, 0.5)):
        got = knn_classify(feats, labels, queries, queries_labels, k, t, chunk=7)["top1"]
        assert got == brute_force_top1(feats, labels, queries, queries_labels, k, t, False)
        loo = knn_classify(feats, labels, feats, labels, k, t, leave_one_out=True, chunk=7)["top1"]
        assert loo == brute_force_top1(feats, labels, feats, labels, k, t, True)
    assert 40 < knn_classify(feats, labels, queries, queries_labels)["top1"] <= 100  # separable enough


def test_trainer_logs_knn_and_probe_each_epoch(tiny_data, tmp_path):
    from helpers import REPO, read_metrics, tiny_cfg

    from sslight_dali.train import train
    result = train(tiny_cfg(REPO / "configs/dino/resnet18_sslight.yaml", tiny_data, tmp_path, "train.epochs=2",
                            "train.knn_every=1", "eval.knn_k=5"))
    evals = read_metrics(tmp_path, "eval")
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 and 0 <= r["probe_top1"] <= 100 for r in evals)
    assert result["knn_top1"] == evals[-1]["knn_top1"]


def test_knn_evaluate_tells_a_working_feature_from_a_broken_one(tmp_path):
    """End to end through the eval loader: on data whose class is the image's colour, mean-colour
    features classify (nearly) every image, features that ignore the image stay near chance (25%).
    A misaligned feature/label pairing, a wrong split or a loader returning other images than its
    labels say drops the first to chance too."""
    import numpy as np
    from PIL import Image

    from sslight_dali.run_config import load_config
    from sslight_dali.knn import knn_evaluate

    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 180, 60), (50, 70, 210), (220, 200, 40)]
    for split, n in (("train", 10), ("val", 6)):
        for c, rgb in enumerate(colours):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 65, 2)
                img = np.clip(np.array(rgb) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(tmp_path / split / f"c{c}" / f"{i}.png")

    class MeanColour(torch.nn.Module):
        def forward(self, x):
            return x.float().mean(dim=(2, 3))

    class IgnoresImage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = torch.Generator().manual_seed(1)

        def forward(self, x):
            return torch.randn(len(x), 3, generator=self.g)

    for mode in ("val_loo", "train_val"):
        cfg = load_config("configs/dino/resnet18_sslight.yaml", [
            f"data.root={tmp_path}", "data.device=cpu", "data.num_threads=1", "eval.resize=36", "eval.crop=32",
            "eval.batch_size=5", f"eval.knn_mode={mode}", "eval.knn_k=5"])
        good = knn_evaluate(cfg, MeanColour(), torch.device("cpu"), channels_last=False)[0]
        bad = knn_evaluate(cfg, IgnoresImage(), torch.device("cpu"), channels_last=False)[0]
        assert good["n"] == bad["n"] == 24
        # Measured: 100% and 12.5% (val_loo), 100% and 20.8% (train_val).
        assert good["top1"] >= 95, (mode, good)
        assert bad["top1"] <= 50, (mode, bad)
