"""`fuse zoo build DIR` and `fuse zoo evaluate DIR`: make the tiny model zoo, and print how each model does.

Also what `python -m fuse.zoo` runs; imports torch only inside the commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from fuse.logs import setup_logging


def cmd_build(args: argparse.Namespace) -> int:
    from fuse.zoo import ZooSettings, build_zoo

    zoo = build_zoo(args.directory, ZooSettings(seed=args.seed), workers=args.workers, force=args.force)
    print(json.dumps({"root": str(zoo.root), "models": {k: str(v) for k, v in zoo.models.items()}}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fuse.evaluation import (
        evaluate_models,
        load_domain_samples,
        load_items,
        load_texts,
        markdown_table,
    )
    from fuse.zoo import Zoo

    zoo = Zoo.from_dir(args.directory)
    items = load_items(zoo.eval_items, args.max_items_per_skill)
    texts, domains = load_texts(zoo.heldout_text), load_domain_samples(zoo.heldout_domains)
    metrics = evaluate_models(zoo.models, items, texts, args.max_new_tokens, domains=domains)
    print(markdown_table(metrics), end="")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser("zoo", help="the tiny heterogeneous model zoo (tests and the CPU demo)")
    commands = zoo.add_subparsers(dest="zoo_command", required=True)
    build = commands.add_parser(
        "build", help="build the zoo in DIR (a second call with the same settings is free)"
    )
    build.add_argument("directory")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--workers", type=int, default=2, help="models trained in parallel (one thread each)")
    build.add_argument("--force", action="store_true", help="rebuild even if an up-to-date zoo is there")
    build.set_defaults(handler=cmd_build)
    evaluate = commands.add_parser(
        "evaluate",
        help="print per-skill accuracy, CE/byte and per-domain CE/byte (with the limit) of the zoo's models",
    )
    evaluate.add_argument("directory")
    evaluate.add_argument("--max-items-per-skill", type=int, default=None)
    evaluate.add_argument("--max-new-tokens", type=int, default=16)
    evaluate.set_defaults(handler=cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuse.zoo", description="the tiny model zoo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["zoo", *(sys.argv[1:] if argv is None else argv)])
    setup_logging(logging.INFO, "%(asctime)s %(name)s: %(message)s")
    return args.handler(args)
