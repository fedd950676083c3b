"""`muse download|encode|train|sample|eval|run --config pipeline.yaml --set key=value`.

Each subcommand loads and validates the one config, then calls the library. Phase
modules are imported lazily so `muse --help` and config errors are instant.
"""

from __future__ import annotations

import argparse
import sys

from muse.config import ConfigError, PipelineConfig, load_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="pipeline.yaml", help="pipeline config (default: pipeline.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("download", "phase 1: URL list -> image shards (failures replaced)"),
                        ("encode", "phase 2: image shards -> T5 + VQ token shards"),
                        ("train", "train the model with torchrun from the encoded shards"),
                        ("sample", "text -> image with parallel decoding"),
                        ("eval", "FID and CLIP score of a checkpoint on the held-out eval slice"),
                        ("run", "download, encode, train and sample in order")]:
        p = sub.add_parser(name, help=help_)
        _common(p)
        if name == "train":
            p.add_argument("--resume", default="latest",
                           help="'latest' (default), 'none', or a checkpoint path")
        if name == "sample":
            p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
            p.add_argument("--prompts-file", help="one prompt per line; also writes a grid image")
            p.add_argument("--checkpoint", help="base model checkpoint (default: latest of the run)")
            p.add_argument("--superres-checkpoint", help="super-resolution checkpoint (optional)")
            p.add_argument("--out", help="output PNG path")
        if name == "eval":
            p.add_argument("--checkpoint", help="checkpoint dir (default: latest of train.run_name)")
            p.add_argument("--max-samples", type=int, help="eval rows to score (default: eval.max_samples)")
    return parser


def _sample_overrides(args) -> list[str]:
    extra = []
    if args.command != "sample":
        return extra
    if getattr(args, "prompt", None):
        import json

        extra.append("sample.prompts=" + json.dumps(args.prompt))
    for flag, key in [("prompts_file", "prompts_file"), ("checkpoint", "checkpoint"),
                      ("superres_checkpoint", "superres_checkpoint"), ("out", "out")]:
        value = getattr(args, flag, None)
        if value:
            extra.append(f"sample.{key}={value}")
    return extra


def run_phase(name: str, cfg: PipelineConfig, config_path: str | None, overrides: list[str],
              resume: str = "latest", args=None) -> None:
    if name == "download":
        from muse.download import run_download

        run_download(cfg)
    elif name == "encode":
        from muse.encode import run_encode

        run_encode(cfg)
    elif name == "train":
        from muse.train import launch

        launch(cfg, config_path=config_path, overrides=overrides, resume=resume)
    elif name == "sample":
        from muse.sample import run_sample

        run_sample(cfg)
    elif name == "eval":
        from muse.evaluate import run_eval

        run_eval(cfg, checkpoint_ref=getattr(args, "checkpoint", None),
                 max_samples=getattr(args, "max_samples", None))
    else:
        raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = args.overrides + _sample_overrides(args)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"muse: {e}", file=sys.stderr)
        return 2
    phases = ["download", "encode", "train", "sample"] if args.command == "run" else [args.command]
    for phase in phases:
        try:
            run_phase(phase, cfg, args.config, overrides, resume=getattr(args, "resume", "latest"), args=args)
        except (RuntimeError, ValueError, FileNotFoundError) as e:  # our errors say what and where
            print(f"muse {phase}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
