"""`fuse merge CONFIG [OUTPUT]`: merge homologous checkpoints outside a recipe run (base, models, method, output).

CONFIG is fuse's format or mergekit's, read as written (`fuse merge config.yml OUT` as `mergekit-yaml config.yml OUT`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fuse.io import write_json_atomic, write_text_atomic

EXAMPLE = """example CONFIG (fuse's format):
  base_model: ./pivot
  models:
    - {path: ./target-a, parameters: {weight: 1.0, density: 0.5}}
    - {path: ./target-b, parameters: {weight: 1.0, density: 0.5}}
  method: ties            # see the methods below
  parameters: {normalize: true}
  output: ./merged
  dtype: bfloat16         # or float32, float16, auto (the base's)
  max_shard_size: 2GB
  seed: 0

or mergekit's, as written (`fuse merge CONFIG OUTPUT`, like `mergekit-yaml CONFIG OUTPUT`):
  merge_method: ties
  base_model: ./pivot
  models:
    - model: ./target-a
      parameters: {weight: 1.0, density: 0.5}
    - model: ./target-b
      parameters: {weight: 1.0, density: 0.5}
  parameters: {normalize: true}
  dtype: bfloat16

methods: linear task_arithmetic ties dare_linear dare_ties breadcrumbs breadcrumbs_ties della della_linear
  slerp nuslerp model_stock karcher sce sce_mergekit varm (fuse/merging/README.md)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge homologous models in parameter space (streamed)",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", help="merge YAML: fuse's (base_model, models, method, …) or mergekit's (merge_method, …)"
    )
    parser.add_argument(
        "output_dir", nargs="?", metavar="OUTPUT", help="output folder (as mergekit-yaml's OUT_PATH)"
    )
    parser.add_argument("--output", "-o", help="output folder; overrides the config's output:")
    parser.set_defaults(handler=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from fuse.merging.config import load_merge_config
    from fuse.merging.engine import report_markdown, run_merge
    from fuse.merging.methods import MergeConfigError
    from fuse.merging.preflight import PreflightError

    logging.getLogger("fuse.merging").setLevel(logging.INFO)
    try:
        if args.output and args.output_dir and Path(args.output) != Path(args.output_dir):
            raise MergeConfigError(f"two output folders: {args.output_dir} and --output {args.output}")
        config = load_merge_config(args.config)
        chosen = args.output_dir or args.output or config.output
        if not chosen:
            raise MergeConfigError(
                f"{args.config}: no output folder: `fuse merge CONFIG OUTPUT`, --output, or output: in the config"
            )
        output = Path(chosen)
        report = run_merge(config, output)
    except (MergeConfigError, PreflightError, FileNotFoundError) as error:
        print(f"error: {error}")
        return 2
    write_json_atomic(output / "merge_report.json", report)
    write_text_atomic(output / "merge_report.md", report_markdown(report))
    print(
        f"merged {len(config.models)} model(s) with {config.method} into {output} in {report['seconds']:.1f} s"
    )
    shares = report["diagnostics"]["families"]["all"]["energy_share"]
    print("delta energy kept: " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items() if v is not None))
    for line in report["diagnostics"]["verdict"]:
        print(f"  {line}")
    print(f"diagnostics: {output / 'merge_report.md'}")
    return 0
