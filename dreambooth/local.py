"""Local runs without a cluster: ``dreambooth train`` and ``dreambooth demo``."""

from __future__ import annotations

import argparse
import json

from dreambooth.api import build_trainer_config, validate_job
from dreambooth.api.exitcodes import ExitCode
from dreambooth.demo import demo_job_document


def cmd_demo(args: argparse.Namespace) -> int:
    from dreambooth.cli import local_defaults

    job = validate_job(demo_job_document())
    print(json.dumps(build_trainer_config(job, local_defaults(None)).wire(), indent=2))
    return ExitCode.OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a small local DreamBooth job on an embedded default")
    p.set_defaults(func=cmd_demo)
