"""The ``dreambooth`` command: validate, render and train jobs locally, generate the CRD.

Sub-commands that need no GPU stack (validate, render, crd) import neither torch nor kopf.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dreambooth.api import (
    KIND,
    SpecError,
    build_trainer_config,
    validate_job,
)
from dreambooth.api.exitcodes import ExitCode
from dreambooth.jobfiles import UsageError, job_documents, load_job, local_defaults


def cmd_validate(args: argparse.Namespace) -> int:
    from dreambooth.api.sweep import KIND as SWEEP_KIND
    from dreambooth.api.sweep import validate_sweep

    failed = 0
    for path in args.files:
        try:
            docs = job_documents(path, also=(SWEEP_KIND,))
        except UsageError as err:
            failed += 1
            print(f"error: {err}", file=sys.stderr)
            continue
        if not docs:
            failed += 1
            print(f"error: {path} holds no {KIND}", file=sys.stderr)
        for doc in docs:
            validate = validate_sweep if doc.kind == SWEEP_KIND else validate_job
            try:
                validate(doc.data, cluster=args.cluster)
                print(f"{doc.where}: {doc.kind} {doc.name}: valid")
            except SpecError as err:
                failed += 1
                print(f"{doc.where}: {doc.kind} {doc.name}: {err}", file=sys.stderr)
    return ExitCode.INVALID_CONFIG if failed else ExitCode.OK


def cmd_render(args: argparse.Namespace) -> int:
    job = load_job(args.file, cluster=args.cluster)
    config = build_trainer_config(job, local_defaults(args.output_root))
    print(json.dumps(config.wire(), indent=2))
    return ExitCode.OK


def cmd_crd(args: argparse.Namespace) -> int:
    from dreambooth.api import crd, crd_sweep

    if args.write:
        for path in [*crd.write(args.root), *crd_sweep.write(args.root)]:
            print(f"wrote {path}")
    else:
        sys.stdout.write(crd.render() + "---\n" + crd_sweep.render())
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreambooth", description="DreamBooth fine-tuning of Stable Diffusion, on Kubernetes or locally."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check DreamBoothJob manifests and explain every problem")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--cluster", action="store_true", help="check for a cluster (no file:// URIs)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="print the effective TrainerConfig of a job (presets applied)")
    p.add_argument("file", type=Path)
    p.add_argument("--cluster", action="store_true", help="check for a cluster (no file:// URIs)")
    p.add_argument("--output-root", help="where outputs go when spec.output.uri is unset")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("crd", help="print the CustomResourceDefinition generated from the API types")
    p.add_argument("--write", action="store_true", help="write crds/ and the chart's copy instead")
    p.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    p.set_defaults(func=cmd_crd)

    from dreambooth import local
    from dreambooth.gallery import cli as gallery

    local.add_commands(sub)
    gallery.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.INVALID_CONFIG


if __name__ == "__main__":
    sys.exit(main())
