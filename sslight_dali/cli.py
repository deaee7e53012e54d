"""`sslight` command line. Each subcommand's module is imported only when it runs: `sslight --help`
imports neither torch nor DALI, and `sslight bench ...` imports the bench module, not the viewer's."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from .api import EXPORT_FORMATS  # torch-free: the functions import what they run
from .backbones import BACKBONES  # torch-free: the export formats each backbone has, for --help


def _having(fmt: str) -> str:
    """The backbones whose table entry declares export format `fmt` (for --help)."""
    return ", ".join(name for name, entry in BACKBONES.items() if fmt in entry.formats)


CHECKPOINT_HELP = "a checkpoint written by `sslight train` (or `sslight import-reference`)"
WEIGHTS_HELP = "student (default, what the reference evaluates) or the momentum teacher"
OVERRIDES_HELP = "overrides as key.sub=value (e.g. train.batch_size=64 data.root=/data/in1k); a bare leaf name works when unambiguous (resume=auto)"


def _config_show(args) -> int:
    from .config import dump_config  # light: each command's modules load when it runs
    from .run_config import load_config  # light: as above
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _data_synth(args) -> int:
    from .synth import synth_dataset  # light: as above
    try:
        summary = synth_dataset(args.out, classes=args.classes, per_class=args.per_class,
                                val_per_class=args.val_per_class, seed=args.seed, min_side=args.min_side,
                                max_side=args.max_side, quality=args.quality, clutter=args.clutter,
                                colors=args.colors, workers=args.workers)
    except ValueError as e:  # an out-of-range option: one line, like every other bad input
        print(f"sslight: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


# The commands below are the Python API's functions (api.py) with the command line's printing.
def _train(args) -> int:
    from .api import train  # light: as above (torch, DALI)
    result = train(args.config, args.overrides)
    print(json.dumps(result, indent=2))
    return 0


def _export(args) -> int:
    from .api import export  # light: as above
    meta = export(args.checkpoint, args.format, args.out, args.weights, args.feature, args.fp16)
    print(json.dumps(meta, indent=2))
    if args.format == "hf":
        print(f"wrote {args.out}/ ({', '.join(sorted(p.name for p in Path(args.out).iterdir()))})", file=sys.stderr)
    elif args.format == "onnx":
        v = meta["onnx"]["verification"]
        print(f"wrote {args.out} and {args.out}.json (onnxruntime vs PyTorch: max abs error {v['max_abs_err']:.3g}, "
              f"relative {v['max_rel_err']:.3g}, bound {v['max_rel_err_bound']:g})", file=sys.stderr)
    else:
        print(f"wrote {args.out} and {args.out}.json", file=sys.stderr)
    return 0


def _evaluate(args) -> int:
    from .api import evaluate  # light: as above
    evaluate(args.eval_command, args.checkpoint, args.overrides, args.out, args.weights, getattr(args, "subset", None))
    return 0


def _embed(args) -> int:
    from .api import embed  # light: as above
    print(json.dumps(embed(args.checkpoint, None, args.out, args.overrides, args.split, args.weights), indent=2))
    return 0


def _import_reference(args) -> int:
    from .export import import_main  # light: as above
    return import_main(args)


def _delegate(module: str):
    def run(args) -> int:
        return importlib.import_module(f"sslight_dali.{module}").main(args) or 0
    return run


def _checkpoint_command(sub, name: str, help_: str, description: str, out_help: str) -> argparse.ArgumentParser:
    """A subcommand that reads a checkpoint's backbone and writes --out."""
    p = sub.add_parser(name, help=help_, description=description)
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--weights", default="student", choices=("student", "teacher"), help=WEIGHTS_HELP)
    return p


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; a delegated subcommand's arguments are added (and its module imported) only when
    `command` names it, so listing the subcommands imports none of them."""
    p = argparse.ArgumentParser(prog="sslight", description="SSLight self-supervised pre-training with DALI view sampling")
    sub = p.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    show = cfg.add_parser("show", help="print the resolved config (defaults <- file <- recipe <- overrides)")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    show.set_defaults(func=_config_show)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the embedded synthetic ImageFolder dataset (train/ and val/)")
    synth.add_argument("--out", required=True)
    synth.add_argument("--classes", type=int, default=10)
    synth.add_argument("--per-class", type=int, default=60, help="train images per class")
    synth.add_argument("--val-per-class", type=int, default=20)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--min-side", type=int, default=96)
    synth.add_argument("--max-side", type=int, default=320)
    synth.add_argument("--quality", type=int, default=90, help="JPEG quality")
    synth.add_argument("--clutter", type=float, default=1.0, help="background texture strength (0: flat)")
    synth.add_argument("--colors", type=int, default=0,
                       help="draw shape and background colours from a palette of this many (0: any RGB colour)")
    synth.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    synth.set_defaults(func=_data_synth)

    train = sub.add_parser("train", help="pre-train (one process, or under torchrun for several)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.set_defaults(func=_train)

    exp = _checkpoint_command(sub, "export", "write a checkpoint's backbone alone, for timm, torchvision, "
                              "Detectron2, ONNX or a timm/Hugging Face hub folder (+ a FILE.json sidecar)",
                              "Loading code for each format and the measured ONNX errors: README, 'Export and deploy'.",
                              "output file (written atomically; FILE.json beside it); a .pkl name for detectron2; "
                              "a .safetensors name for timm or torchvision writes safetensors (needs safetensors); "
                              "a folder for hf")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                     help="timm: all backbones, timm.create_model(name, num_classes=0) loads it strictly; "
                          f"torchvision: {_having('torchvision')}; detectron2: {_having('detectron2')} (.pkl); "
                          "onnx: all backbones, the eval-mode model images [batch, 3, crop, crop] -> features "
                          "[batch, D] with a dynamic batch axis, opset 18, torch's dynamo exporter, checked in "
                          "onnxruntime (CPU) against PyTorch before it is written: refused above a max relative "
                          "error of 1e-4 (fp16: 1e-2); measured on a 2-core CPU at most 1.2e-6 (fp16 7.5e-4) "
                          "(needs onnx, onnxscript, onnxruntime); "
                          "hf: all backbones, a folder with model.safetensors, timm's config.json and a model card: "
                          "timm.create_model('local-dir:FOLDER', pretrained=True) loads it, and it uploads to "
                          "the Hugging Face hub as is (needs safetensors). "
                          "A checkpoint of `eval semi` / `eval linear` (reference protocol) exports its classifier "
                          "(the eval's backbone + trained head, images -> logits [batch, num_classes]): onnx "
                          "(verified as above) or timm (its state dict)")
    exp.add_argument("--feature", default=None, choices=("pooled", "eval"),
                     help="onnx only: pooled (default: the backbone's pooled features) or eval (the reference's "
                          "linear-eval feature: for ViT-Tiny the last 4 blocks' CLS tokens through the final norm, "
                          "concatenated, 768-d; for the CNNs the pooled features)")
    exp.add_argument("--fp16", action="store_true",
                     help="onnx only: half-precision weights and compute, float32 input and output; verified "
                          "with a looser bound (max relative error 0.01 instead of 0.0001)")
    exp.set_defaults(func=_export)

    imp = sub.add_parser("import-reference", help="map a released reference SSLight checkpoint onto this "
                                                  "project's backbones (for eval and export)")
    imp.add_argument("file", help="a checkpoint the reference's trainer wrote (DINO_resnet18_last_ckpt.pth.tar) "
                                  "or a released one (dino_r18_sslight.pth.tar)")
    imp.add_argument("--out", required=True, help="checkpoint to write (atomically)")
    imp.add_argument("--config", default=None, help="config to store with it (default: the shipped "
                     "configs/<method>/<backbone>_<baseline|sslight>.yaml whose view sampling the file's own "
                     "config states; by the file name if it has none)")
    imp.set_defaults(func=_import_reference)

    ev = sub.add_parser("eval", help="evaluate a pre-trained checkpoint with the reference's protocols")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    for name, help_ in (("linear", "linear classifier on the frozen backbone (eval.linear.protocol=reference|fast); "
                                   "writes eval_linear.json"),
                        ("semi", "semi-supervised fine-tuning on a 1%%/10%% labelled subset; writes eval_semi.json"),
                        ("knn", "weighted kNN (eval.knn_mode=val_loo|train_val); writes eval_knn.json")):
        sp = ev_sub.add_parser(name, help=help_, description=help_.replace("%%", "%"))
        sp.add_argument("checkpoint", help="a checkpoint written by `sslight train`")
        if name == "semi":
            sp.add_argument("--subset", required=True,
                            help="1 or 10 (percent of each class, drawn with eval.semi.seed and written next to the "
                                 "results), or a subset file with lines 'dataset_index,label,wnid,filename'")
        sp.add_argument("--weights", choices=("student", "teacher"), default="student",
                        help="which backbone of the checkpoint (the reference evaluates the student)")
        sp.add_argument("--out", default="", help=f"output directory (default: <checkpoint dir>/eval_{name})")
        sp.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + f"; a bare key means eval.{name}.<key> "
                        "first; train.resume/device/precision/seed/log_every/checkpoint_every/max_steps apply"
                        if name != "knn" else OVERRIDES_HELP)
        sp.set_defaults(func=_evaluate)

    emb = _checkpoint_command(sub, "embed", "eval-view features of every image of a split, with file paths and "
                              "labels, to .npz or Parquet",
                              "The features `sslight eval knn` uses (pooled backbone features of the eval view, not "
                              "normalised), in dataset order; several processes under torchrun.",
                              "FILE.npz (features, paths, labels, classes, meta) or FILE.parquet (needs pyarrow); "
                              "written atomically")
    emb.add_argument("--split", default="val", help="val (data.val_split, default), train (data.train_split) or a "
                                                    "split name")
    emb.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + "; data.root=DIR and data.format=imagefolder|"
                     "folder|filelist|webdataset name the images (default: the checkpoint's)")
    emb.set_defaults(func=_embed)

    for name, module, help_ in (("views", "viewer", "contact sheet of the views a recipe makes from one image"),
                                ("demo", "demo", "synthetic data -> short DINO-SSLight run -> kNN vs random init"),
                                ("bench", "bench", "throughput benchmarks (pipeline, model, train, compare, tune)")):
        if importlib.util.find_spec(f"sslight_dali.{module}") is None:
            continue  # not built yet: never advertise a subcommand that does not work
        sp = sub.add_parser(name, help=help_)
        if name == command:
            importlib.import_module(f"sslight_dali.{module}").add_arguments(sp)
        sp.set_defaults(func=_delegate(module))
    return p


def _user_errors() -> tuple:
    """Exceptions that mean bad input or a stopped run: printed as one line, not a traceback."""
    errors = [FileNotFoundError]
    for module, name in (("sslight_dali.config", "ConfigError"), ("sslight_dali.checkpoint", "CheckpointError"),
                         ("sslight_dali.data_formats", "DataError"), ("sslight_dali.run_policy", "NonFiniteLossError"),
                         ("sslight_dali.loop", "PeerLostError"),
                         ("sslight_dali.bench", "BenchError"), ("sslight_dali.export", "ExportError")):
        mod = sys.modules.get(module)  # only those already imported can have been raised
        if mod is not None:
            errors.append(getattr(mod, name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after an option (`eval linear CKPT --out DIR epochs=5`) come back unparsed
        if not hasattr(args, "overrides") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except Exception as e:
        loop = sys.modules.get("sslight_dali.loop")  # only a run loop (train, eval) stops on a signal
        if loop is not None and isinstance(e, loop.Preempted):  # a checkpoint was written: requeue, resume
            print(f"sslight: {e}", file=sys.stderr)
            return loop.EXIT_PREEMPTED
        if not isinstance(e, _user_errors()):
            raise
        from .config import ConfigError  # light: only once a command ran (it has loaded config)
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"sslight: {kind}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
