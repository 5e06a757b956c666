"""`opd train`: run the local engine from a YAML file, the launcher variables and/or key=value overrides.

    opd train --config run.yaml lr=5e-4 algo.top_k=4        # YAML + overrides
    bash on_policy_distillation.sh                          # the launcher: `opd train --from-env "$@"`
    opd train --from-env --print-config                     # show the resolved configuration and stop

Precedence, lowest first: TrainConfig defaults < the launchers' own defaults < --config YAML < variables set by the
caller (--from-env) < key=value.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from opd.engines.local.config import ENV_VARS

    variables = "\n".join(f"  {var:<22} -> {key}" for var, key in ENV_VARS.items())
    parser = argparse.ArgumentParser(
        prog="opd train",
        description="Train a student by on-policy distillation (or GRPO) with the local engine: one process, CPU "
        "or one GPU, plain PyTorch + transformers. Models are local Hugging Face folders (nothing is downloaded; "
        "`opd demo` builds toy ones).",
        epilog="settings: key=value, where key is a TrainConfig field (e.g. lr, mini_batch_size), an algorithm "
        "field as algo.<name> (e.g. algo.top_k), or a launcher variable name (e.g. LOG_PROB_TOP_K).\n"
        "launcher variables (read with --from-env):\n" + variables,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of settings (flat keys; algorithm knobs under `algo:`)")
    parser.add_argument("--from-env", action="store_true",
                        help="read the launcher variables (ADV_ESTIMATOR, LR, ...) from the environment")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML (with the run folder) and exit")
    parser.add_argument("settings", nargs="*", metavar="key=value", help="overrides, applied last")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from opd.engines.local.config import (TrainConfig, config_yaml, from_env, from_yaml, resolve, run_name_from,
                                          split_launcher_env)

    overrides = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"opd train: expected key=value, got {item!r}", file=sys.stderr)
            return 2
        overrides[key] = value
    try:
        launcher_defaults, caller_env = split_launcher_env() if args.from_env else ({}, {})
        cfg = from_env(TrainConfig(), launcher_defaults) if launcher_defaults else TrainConfig()
        if args.config:
            cfg = from_yaml(args.config, base=cfg)
        if args.from_env:
            cfg = from_env(cfg, caller_env)
        cfg = resolve(cfg, overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"opd train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_yaml(cfg), end="")
        print(f"# run folder: {cfg.output_dir}/{cfg.run_name or run_name_from(cfg)}")
        return 0
    from opd.engines.local.trainer import train

    try:
        run_dir = train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"opd train: {exc}", file=sys.stderr)
        return 1
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
