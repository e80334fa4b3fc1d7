"""`fuse merge CONFIG`: merge homologous checkpoints outside a recipe run (base, models, method, output)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fuse.io import write_json_atomic, write_text_atomic

EXAMPLE = """example CONFIG:
  base_model: ./pivot
  models:
    - {path: ./target-a, parameters: {weight: 1.0, density: 0.5}}
    - {path: ./target-b, parameters: {weight: 1.0, density: 0.5}}
  method: ties            # linear task_arithmetic ties dare_linear dare_ties breadcrumbs sce sce_mergekit varm
  parameters: {normalize: true}
  output: ./merged
  dtype: bfloat16         # or float32, float16, auto (the base's)
  max_shard_size: 2GB
  seed: 0
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge homologous models in parameter space (streamed)",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", help="merge YAML (base_model, models, method, parameters, output, dtype, …)"
    )
    parser.add_argument("--output", "-o", help="override the config's output folder")
    parser.set_defaults(handler=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from fuse.merging.config import load_merge_config
    from fuse.merging.engine import report_markdown, run_merge
    from fuse.merging.methods import MergeConfigError
    from fuse.merging.preflight import PreflightError

    logging.getLogger("fuse.merging").setLevel(logging.INFO)
    try:
        config = load_merge_config(args.config)
        output = Path(args.output or config.output)
        if not str(args.output or config.output):
            raise MergeConfigError(f"{args.config}: output: no output folder (set output: or pass --output)")
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
