"""`sslight demo` end to end at toy size: data made, trained, kNN and the fast linear probe before/after and
speed reported."""
import argparse
import json


def test_demo_reports_knn_speed_and_outputs(tmp_path, capsys):
    from sslight_dali import demo
    args = argparse.Namespace(out=str(tmp_path / "run"), data=str(tmp_path / "synth"), config=demo.DEMO_CONFIG,
                              overrides=["train.epochs=1", "recipe.global.size=32", "recipe.local.size=16",
                                         "recipe.local.count=2", "eval.resize=37", "eval.crop=32",
                                         "train.batch_size=100", "train.device=cpu", "data.device=cpu",
                                         "train.tensorboard=false", "train.knn_every=1"])
    assert demo.main(args) == 0
    summary = json.loads((tmp_path / "run" / "demo_summary.json").read_text())
    assert summary["steps"] == 10 and summary["epochs"] == 1  # 1000 synthetic train images / batch 100
    assert 0 <= summary["knn_top1_random_init"] <= 100 and 0 <= summary["knn_top1_trained"] <= 100
    # The trainer's own kNN at the last epoch evaluates the same weights as the demo's final one.
    by_epoch = summary["knn_top1_by_epoch"]
    assert list(by_epoch) == ["0", "1"] and by_epoch["0"] == summary["knn_top1_random_init"]
    assert abs(by_epoch["1"] - summary["knn_top1_trained"]) < 1e-6
    # The fast linear probe, random init vs trained: stored and printed beside kNN.
    assert 0 <= summary["linear_fast_top1_random_init"] <= 100 and 0 <= summary["linear_fast_top1_trained"] <= 100
    assert summary["images_per_sec_median"] > 0 and 0 <= summary["data_wait_median"] <= 1
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "synth" / "synth.json").is_file()
    made = json.loads((tmp_path / "synth" / "synth.json").read_text())
    assert made["colors"] == 2 and made["clutter"] == 0.0  # the demo's own data, not the bench's
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "images/s" in out
    assert f"random init {summary['linear_fast_top1_random_init']:.1f}%  ->  trained " \
           f"{summary['linear_fast_top1_trained']:.1f}%" in out.split("fast linear probe top-1")[-1]
