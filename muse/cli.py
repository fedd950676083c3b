"""`muse download|encode|train|sample|eval|run|plan --config pipeline.yaml --set key=value`.

Each subcommand loads and validates the one config, runs the cheap checks of
`muse.preflight` (storage root, inputs, output location, hub models) and only then calls
the library, which loads the models. Phase modules are imported lazily so `muse --help`
and config errors are instant.

Exit codes: 0 done; 2 a user mistake (config, missing input or checkpoint, unreachable
storage or hub), printed as one line `muse <command>: <what>: <what to do>`; 1 a phase that
failed (its error in one line) or an unexpected error (with its traceback). `--debug` or
`MUSE_DEBUG=1` adds the traceback to every error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from muse.config import PipelineConfig, load_config

# The config sections each command reads (shown in its --help).
SECTIONS = {
    "download": "storage, source, download",
    "encode": "storage, encode",
    "train": "storage, encode (dataset version), model, train, eval and sample (in-training evaluation/samples)",
    "sample": "storage, encode (text and VQ models), train (run_name), sample",
    "eval": "storage, encode, model, train (run_name, eval_holdout), eval",
    "run": "all: storage, source, download, encode, model, train, sample",
    "plan": "storage, source, download, encode, model, train (writes nothing)",
}


# `muse train` on several machines: each flag sets its train.* key (checked there, with the key named)
NODE_FLAGS = {
    "--nnodes": ("nnodes", int, "N", "machines in the job; run the same command on each"),
    "--node-rank": ("node_rank", int, "R", "this machine, 0..N-1; node 0 hosts the rendezvous"),
    "--rdzv-endpoint": ("rdzv_endpoint", str, "HOST:PORT", "node 0's address and a free port, reachable from every node"),
    "--rdzv-id": ("rdzv_id", str, "ID", "the job's id, the same on every node (default muse-<run_name>)"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("muse-pipeline")
    except PackageNotFoundError:  # run from a checkout without `pip install -e .`
        return "unknown (not installed)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="pipeline.yaml", help="pipeline config (default: pipeline.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of every error (also: MUSE_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muse", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"muse {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("download", "phase 1: URL list -> image shards (failures replaced)"),
                        ("encode", "phase 2: image shards -> T5 + VQ token shards"),
                        ("train", "train the model with torchrun from the encoded shards"),
                        ("sample", "text -> image with parallel decoding"),
                        ("eval", "FID and CLIP score of a checkpoint on the held-out eval slice"),
                        ("run", "download, encode, train and sample in order"),
                        ("plan", "what `muse run` would do and roughly cost, before anything runs")]:
        p = sub.add_parser(name, help=help_, description=f"{help_}\n\nReads config sections: {SECTIONS[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # one line per fact, unwrapped
        _common(p)
        if name == "train":
            p.add_argument("--resume", default="latest",
                           help="'latest' (default), 'none', or a checkpoint path")
            for flag, (key, type_, metavar, help_) in NODE_FLAGS.items():
                p.add_argument(flag, type=type_, metavar=metavar, help=f"{help_} (train.{key})")
        if name == "sample":
            p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
            p.add_argument("--prompts-file", help="one prompt per line; also writes a grid image")
            p.add_argument("--checkpoint", help="base model checkpoint (default: latest of the run)")
            p.add_argument("--superres-checkpoint", help="super-resolution checkpoint (optional)")
            p.add_argument("--out", help="output PNG path")
        if name == "plan":
            _plan_args(p)
        if name == "download":
            p.add_argument("--retry-replaced", action="store_true",
                           help="then fetch rows replaced for a retryable reason again, into new shard "
                                "generations (download.retry_replaced; see download.retry_after_s, "
                                "download.max_retries_per_row)")
        if name == "eval":
            p.add_argument("--checkpoint", help="checkpoint dir (default: latest of train.run_name)")
            p.add_argument("--max-samples", type=int, help="eval rows to score (default: eval.max_samples)")
    return parser


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=_positive(int), metavar="N",
                   help="plan N selected rows instead of reading source.paths (URL lists not at hand)")
    p.add_argument("--encode-rate", type=_positive(float), metavar="IMG_PER_S",
                   help="measured encode pictures/s per device (bench/gpu_check.sh); default: FLOP-derived")
    p.add_argument("--gpu", metavar="NAME",  # the default lives in muse.plan (imported only when planning)
                   help="the GPU the estimates are for, as torch names it (default: H100 80GB HBM3)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _plan(args, cfg: PipelineConfig) -> None:
    """`muse plan`: no preflight (it would probe the storage root by writing); the plan reads only."""
    import json

    from muse.plan import DEFAULT_GPU, format_plan, plan_run

    plan = plan_run(cfg, rows=args.rows, encode_rate=args.encode_rate, gpu=args.gpu or DEFAULT_GPU)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan), flush=True)


def _node_overrides(args) -> list[str]:
    """`muse train --nnodes 2 ...` as `--set train.nnodes=2 ...` (JSON-quoted strings stay strings)."""
    import json

    return [f"train.{key}={json.dumps(value)}" for flag, (key, *_) in NODE_FLAGS.items()
            if (value := getattr(args, flag[2:].replace("-", "_"), None)) is not None]


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
        from muse.launch import launch

        launch(cfg, config_path=config_path, overrides=overrides, resume=resume,
               debug=bool(getattr(args, "debug", False)))
    elif name == "sample":
        from muse.sample import run_sample

        run_sample(cfg)
    elif name == "eval":
        from muse.evaluate import run_eval

        run_eval(cfg, checkpoint_ref=getattr(args, "checkpoint", None),
                 max_samples=getattr(args, "max_samples", None))
    else:
        raise ValueError(name)


def _user_mistake(err: BaseException) -> bool:
    """Errors that name what the user should change (exit 2). Classes of modules that were never
    imported cannot have been raised, so they are looked up without importing anything."""
    names = [("muse.config", "ConfigError"), ("muse.preflight", "UsageError"), ("muse.hub", "HubUnavailable"),
             ("muse.download.sources", "SourceError"), ("muse.layout", "DataError")]
    classes = tuple(getattr(sys.modules[m], n) for m, n in names if m in sys.modules)
    return isinstance(err, classes)


def one_line(message: str) -> str:
    """A multi-line message (a config error lists its keys on lines below a heading) as one line."""
    out = ""
    for line in (ln.strip() for ln in str(message).splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def report(where: str, err: BaseException, debug: bool) -> int:
    """Print `err` for the user; the exit code: 2 user mistake, 1 anything else."""
    user = _user_mistake(err)
    ours = type(err).__module__.startswith("muse.")  # our errors say what and where
    if debug or not (user or ours):
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    if user:
        print(f"{where}: {one_line(err)}", file=sys.stderr)
        return 2
    if ours:
        print(f"{where}: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
    return 1


def _run(args, cfg: PipelineConfig, overrides: list[str]) -> None:
    """Preflight, then the phase(s); `muse run` checks each later phase again just before it."""
    from muse import preflight

    if args.command == "plan":
        return _plan(args, cfg)
    if args.command == "run":
        preflight.check_run(cfg, args)
        phases = ["download", "encode", "train", "sample"]
    else:
        preflight.check(args.command, cfg, args)
        phases = [args.command]
    for i, phase in enumerate(phases):
        if len(phases) > 1:
            print(f"muse run: {phase}", file=sys.stderr, flush=True)  # which phase an error line belongs to
        if i:  # its inputs exist only now
            preflight.check(phase, cfg, args)
        run_phase(phase, cfg, args.config, overrides, resume=getattr(args, "resume", "latest"), args=args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("MUSE_DEBUG", "") not in ("", "0")
    where = f"muse {args.command}"
    try:
        overrides = args.overrides + _sample_overrides(args) + _node_overrides(args)
        if getattr(args, "retry_replaced", False):
            overrides.append("download.retry_replaced=true")
        cfg = load_config(args.config, overrides)
        _run(args, cfg, overrides)
    except Exception as err:  # noqa: BLE001 - sorted by report(): one line or a traceback
        return report(where, err, debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
