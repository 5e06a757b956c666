"""`opd train`: run the local engine from a preset, a YAML file, the launcher variables and/or key=value overrides.

    opd train --config run.yaml lr=5e-4 algo.top_k=4        # YAML + overrides
    opd train --preset grpo actor_model_path=/m/student      # a named recipe (opd.presets)
    bash on_policy_distillation.sh                          # the launcher: `opd train --from-env "$@"`
    opd train --from-env --print-config                     # show the resolved configuration and stop

Precedence, lowest first: TrainConfig defaults < preset < --config YAML < launcher variables (--from-env; those
equal to the launcher's own defaults do not count) < key=value; the merged result is validated once.
"""

from __future__ import annotations

import argparse
import os
import textwrap

from opd.errors import UsageError, command, usage_errors


def _parser() -> argparse.ArgumentParser:
    from opd.engines.local.config import ENV_VARS
    from opd.presets import PRESETS

    variables = "\n".join(f"  {var:<22} -> {key}" for var, key in ENV_VARS.items())
    presets = "\n".join(
        textwrap.fill(
            " ".join(f"{k}={v}" for k, v in settings.items()) or "(the defaults)",
            width=118,
            initial_indent=f"  {name:<9}",
            subsequent_indent=" " * 11,
        )
        for name, settings in PRESETS.items()
    )
    parser = argparse.ArgumentParser(
        prog="opd train",
        description="Train a student by on-policy distillation (or GRPO) with the local engine: one process, CPU "
        "or one GPU, plain PyTorch + transformers. Models are local Hugging Face folders (nothing is downloaded; "
        "`opd demo` builds toy ones).",
        epilog="settings: key=value, where key is a TrainConfig field (e.g. lr, mini_batch_size), an algorithm "
        "field as algo.<name> (e.g. algo.top_k), or a launcher variable name (e.g. LOG_PROB_TOP_K).\n"
        "presets (--preset NAME, or `preset: NAME` in the YAML):\n" + presets + "\n"
        "launcher variables (read with --from-env):\n" + variables,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="named recipe under the YAML and everything else (default: the TrainConfig defaults)",
    )
    parser.add_argument("--config", help="YAML file of settings (flat keys; algorithm knobs under `algo:`)")
    parser.add_argument(
        "--from-env",
        action="store_true",
        help="read the launcher variables (ADV_ESTIMATOR, LR, ...) from the environment",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as YAML (with the run folder) and exit",
    )
    parser.add_argument("settings", nargs="*", metavar="key=value", help="overrides, applied last")
    return parser


@command("opd train")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from opd.engines.local.config import config_yaml, load_config, run_name_from

    overrides = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {item!r}")
        overrides[key] = value
    with usage_errors():  # bad settings are a usage error (exit 2); what training meets later exits 1
        cfg = load_config(args.preset, args.config, os.environ if args.from_env else None, overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        print(f"# run folder: {cfg.output_dir}/{cfg.run_name or run_name_from(cfg)}")
        return 0
    from opd.engines.local.trainer import train

    print(f"run folder: {train(cfg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
