"""The `kubetron` command: validate and render MegatronJobs offline, print the CRD.

`kubetron validate` runs the same parse and plan as the operator, so a spec that passes here is
accepted by the operator; `kubetron render` prints exactly the objects the operator applies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from kubetron_api import ckpt_inspect
from kubetron_api.parse import SpecError, load_documents, parse_job
from kubetron_api.v1alpha1 import MegatronJob
from kubetron_operator.cli.crd import crd_yaml
from kubetron_operator.cli.docs import generated_block
from kubetron_operator.cli.rbac import helm_rules_template, rbac_yaml
from kubetron_operator.plan import Plan, PlanError, plan
from kubetron_operator.render import render, to_yaml


def _check(path: Path) -> tuple[list[tuple[str, Plan, MegatronJob]], list[str]]:
    """Parse and plan every document; return the good ones and every error message."""
    good: list[tuple[str, Plan, MegatronJob]] = []
    errors: list[str] = []
    try:
        docs = list(load_documents(path))
    except (OSError, yaml.YAMLError) as err:
        return good, [f"{path}: cannot read: {err}"]
    for source, obj in docs:
        try:
            job = parse_job(obj, source)
            good.append((source, plan(job), job))
        except SpecError as err:
            errors += [f"{source}: {p}" for p in err.problems]
        except PlanError as err:
            errors += [f"{source}: {p}" for p in err.problems]
    return good, errors


def _model_lines(p: Plan) -> list[str]:
    """One line per model of a job of several: its ranks, grid and role; none for one model."""
    return [m.describe() for m in p.models]


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        good, errors = _check(Path(path))
        for source, p, _ in good:
            extra = f" (needs {', '.join(p.requirements)})" if p.requirements else ""
            shape = f"world={p.world_size}" if p.models else p.dims.describe()
            print(f"{source}: valid: {shape}{extra}")
            for line in _model_lines(p):
                print(f"  {line}")
        for line in errors:
            print(line, file=sys.stderr)
        failed |= bool(errors)
    return 1 if failed else 0


def cmd_render(args: argparse.Namespace) -> int:
    good, errors = _check(Path(args.file))
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        return 1
    objs = [obj for _, p, job in good for obj in render(job, p)]
    # each model's grid as YAML comments: stdout stays what `kubectl apply -f -` reads
    header = [f"# {job.name}: model {line}\n" for _, p, job in good for line in _model_lines(p)]
    sys.stdout.write("".join(header) + to_yaml(objs))
    return 0


def cmd_crd(_: argparse.Namespace) -> int:
    sys.stdout.write(crd_yaml())
    return 0


def cmd_docs(_: argparse.Namespace) -> int:
    sys.stdout.write(generated_block() + "\n")
    return 0


def cmd_rbac(args: argparse.Namespace) -> int:
    sys.stdout.write(helm_rules_template() if args.helm else rbac_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check MegatronJob files (schema and plan)")
    v.add_argument("files", nargs="+", help="YAML files")
    v.set_defaults(func=cmd_validate)
    r = sub.add_parser("render", help="print the objects the operator would create")
    r.add_argument("file", help="a YAML file")
    r.set_defaults(func=cmd_render)
    c = sub.add_parser("crd", help="print the MegatronJob CRD generated from the models")
    c.set_defaults(func=cmd_crd)
    b = sub.add_parser("rbac", help="print the operator's least-privilege RBAC manifests")
    b.add_argument("--helm", action="store_true", help="as the chart's _rbac.tpl templates")
    b.set_defaults(func=cmd_rbac)
    d = sub.add_parser("docs", help="print the README's generated configuration reference")
    d.set_defaults(func=cmd_docs)
    k = sub.add_parser("checkpoints", help=ckpt_inspect.SUMMARY)
    k.add_argument("dir", help="a job's checkpoint.path")
    k.add_argument("--json", action="store_true", help="print JSON instead of a table")
    k.set_defaults(func=lambda a: ckpt_inspect.main([a.dir, *(["--json"] if a.json else [])]))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
