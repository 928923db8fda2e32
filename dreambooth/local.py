"""Local runs without a cluster: ``dreambooth train job.yaml`` and ``dreambooth demo``.

Both render the same TrainerConfig the operator would put in a ConfigMap and run the same
entry point a trainer pod runs (``python -m dreambooth.trainer``), in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from dreambooth.api import (
    API_VERSION,
    KIND,
    DreamBoothJob,
    SpecError,
    build_trainer_config,
    validate_job,
)
from dreambooth.api.config import DEFAULT_METRICS_PORT
from dreambooth.api.exitcodes import ExitCode
from dreambooth.api.sweep import KIND as SWEEP_KIND
from dreambooth.api.sweep import DreamBoothSweep, plan, validate_sweep
from dreambooth.api.sweep_runs import (
    COMPARE_JSON,
    COMPARE_PNG,
    child_job,
    compare_config,
    sweep_output_uri,
)
from dreambooth.api.uris import Scheme, parse_uri
from dreambooth.gallery.cli import DEFAULT_PORT
from dreambooth.jobfiles import UsageError, load_documents, load_job, local_defaults


def absolute_file_uris(job: DreamBoothJob, base: Path) -> DreamBoothJob:
    """``file://./photos`` means ``./photos`` from where the command runs: the trainer gets
    absolute ``file:///...`` URIs (it may run elsewhere, e.g. under accelerate)."""

    def fix(uri: str | None) -> str | None:
        parsed = parse_uri(uri, allowed=set(Scheme)) if uri else None
        if parsed is None or parsed.scheme is not Scheme.FILE or os.path.isabs(parsed.path):
            return uri
        absolute = (base / parsed.path).resolve().as_uri()
        return absolute + "/" if uri.endswith("/") else absolute

    spec = job.spec
    updates = {
        "base_model": spec.base_model.model_copy(update={"uri": fix(spec.base_model.uri)}),
        "instance": spec.instance.model_copy(update={"uri": fix(spec.instance.uri)}),
        "prior": spec.prior.model_copy(update={"uri": fix(spec.prior.uri)}),
        "output": spec.output.model_copy(update={"uri": fix(spec.output.uri)}),
    }
    return job.model_copy(update={"spec": spec.model_copy(update=updates)})


def train_job(job, *, output_root: str | None, workdir: Path, metrics_port: int) -> int:
    from dreambooth.trainer.__main__ import main as trainer_main

    defaults = local_defaults(output_root)
    config = build_trainer_config(absolute_file_uris(job, Path.cwd()), defaults).model_copy(
        update={"metrics_port": metrics_port}
    )
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "trainer-config.json"
    config_path.write_text(json.dumps(config.wire(), indent=2))
    summary = workdir / "summary.json"
    code = trainer_main(["--config", str(config_path), "--workdir", str(workdir), "--termination-log", str(summary)])
    if summary.is_file():
        print(summary.read_text())
    return code


def cmd_train(args: argparse.Namespace) -> int:
    job = load_job(args.file)
    workdir = args.workdir or Path("runs") / ".work" / job.metadata.name
    return train_job(job, output_root=args.output_root, workdir=workdir, metrics_port=args.metrics_port)


def cmd_demo(args: argparse.Namespace) -> int:
    from dreambooth.trainer.__main__ import quiet_foreign_warnings

    quiet_foreign_warnings()  # before the demo's model is built (diffusers' imports)
    from dreambooth.demo import prepare_demo

    root = args.root.resolve()
    job = validate_job(prepare_demo(root))
    for stale in ("output", "work"):  # a demo always trains from scratch
        shutil.rmtree(root / stale, ignore_errors=True)
    print(f"demo: tiny Stable-Diffusion-shaped model and 4 instance photos in {root}")
    code = train_job(job, output_root=None, workdir=root / "work", metrics_port=args.metrics_port)
    if code == ExitCode.OK:
        print(
            f"\nDone. The trained model is in {root / 'output' / 'model'} (diffusers), the single "
            f"file in {root / 'output' / 'model.safetensors'}, sample grids in "
            f"{root / 'output' / 'samples'}.\nNext: .venv/bin/dreambooth train "
            "examples/local/toy-cat.yaml with your own photos and a real base model."
        )
        print(
            f"\nLook at it in the browser: .venv/bin/dreambooth gallery {root.parent}\n"
            f"  then open http://127.0.0.1:{DEFAULT_PORT}/jobs/local/{root.name}"
        )
    return code


def load_sweep(path: Path) -> DreamBoothSweep:
    """The one DreamBoothSweep in ``path``, its relative file:// URIs made absolute."""
    sweeps = [d for d in load_documents(path) if d.kind == SWEEP_KIND]
    if len(sweeps) != 1:
        raise UsageError(f"{path} must hold exactly one {SWEEP_KIND}; found {len(sweeps)}")
    try:
        sweep = validate_sweep(sweeps[0].data)
    except SpecError as err:
        raise UsageError(f"{sweeps[0].where}: {err}") from None
    as_job = DreamBoothJob(api_version=API_VERSION, kind=KIND, metadata=sweep.metadata, spec=sweep.spec.template)
    template = absolute_file_uris(as_job, Path.cwd()).spec
    return sweep.model_copy(update={"spec": sweep.spec.model_copy(update={"template": template})})


def cmd_sweep(args: argparse.Namespace) -> int:
    """The sweep's runs one after another (a failed run does not stop the others), then
    compare.png and compare.json in the sweep's prefix, as on a cluster."""
    from dreambooth.trainer.compare import compare

    sweep = load_sweep(args.file)
    the_plan = plan(sweep.spec)
    out = sweep_output_uri(sweep, local_defaults(args.output_root))
    workdir = args.workdir or Path("runs") / ".work" / sweep.metadata.name
    codes = {}
    for run in the_plan.runs:
        job = validate_job(child_job(sweep, run, the_plan, out))
        print(
            f"sweep {sweep.metadata.name}: run {run.number}/{len(the_plan.runs)} {job.metadata.name} ({run.label()})",
            file=sys.stderr,
        )
        codes[job.metadata.name] = train_job(
            job, output_root=args.output_root, workdir=workdir / job.metadata.name, metrics_port=args.metrics_port
        )
    doc = compare(compare_config(sweep, the_plan, out), workdir / "compare")
    failed = [name for name, code in codes.items() if code != ExitCode.OK]
    print(
        json.dumps(
            {
                "sweep": sweep.metadata.name,
                "runs": len(codes),
                "failed": failed,
                "rows": len(doc["rows"]),
                "compare": out + COMPARE_PNG,
                "compareJson": out + COMPARE_JSON,
            }
        )
    )
    return ExitCode.OK if len(failed) < len(codes) else next(iter(codes.values()))


def add_commands(sub: argparse._SubParsersAction) -> None:
    port = int(os.environ.get("DREAMBOOTH_METRICS_PORT", "0"))

    p = sub.add_parser("train", help="train a DreamBoothJob manifest on this machine (no cluster)")
    p.add_argument("file", type=Path)
    p.add_argument(
        "--output-root",
        help="where outputs go when spec.output.uri is unset (default: file://$PWD/runs; an s3:// prefix works too)",
    )
    p.add_argument("--workdir", type=Path, help="scratch folder (default: runs/.work/<name>)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=port,
        help=f"serve Prometheus metrics on this port (0: off; pods use {DEFAULT_METRICS_PORT})",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sweep",
        help="run a DreamBoothSweep's runs on this machine, one after another, and write compare.png / compare.json",
    )
    p.add_argument("file", type=Path)
    p.add_argument(
        "--output-root", help="where outputs go when the template's output.uri is unset (default: file://$PWD/runs)"
    )
    p.add_argument("--workdir", type=Path, help="scratch folder (default: runs/.work/<sweep>)")
    p.add_argument("--metrics-port", type=int, default=port, help="serve Prometheus metrics (0: off)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="a real DreamBooth run on a tiny embedded model (CPU, ~1 min)")
    p.add_argument("--root", type=Path, default=Path("runs/demo"), help="folder for everything")
    p.add_argument("--metrics-port", type=int, default=port, help="serve Prometheus metrics (0: off)")
    p.set_defaults(func=cmd_demo)
