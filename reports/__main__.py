"""python -m reports collect <sweep dir> [--format md,csv,tex,html] [--no-plots]
python -m reports wandb-report <sweep dir> [--project P] [--entity E] [--online]
python -m reports wandb-report <sweep dir>/wandb_report.json --online [--project P] [--entity E]

collect prints the markdown tables and writes table.md / table.csv / table.tex / report.html and
plots/*.png|svg into the sweep dir; wandb-report builds a W&B Report of the sweep (offline: its spec
JSON, wandb_report.json, which a later --online saves as it is; online: saved to W&B, URL printed).
Offline, the report to read is report.html.
python -m reports status <sweep dir> [--watch]: done / running / failed / missing cells of a sweep; --watch
prints the live status (stages, elapsed, estimated time left) until every cell has finished.
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from bench.core.records import CELLS_FILE
from reports.collect import FORMATS, collect
from reports.status import render, status, watch
from reports.wandb_report import build_report, upload_spec


def _formats(text: str) -> tuple:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise argparse.ArgumentTypeError(f"--format {bad[0]!r} is not valid; allowed: {', '.join(FORMATS)}")
    return formats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports")
    commands = parser.add_subparsers(dest="command", required=True)
    collect_cmd = commands.add_parser("collect", help="tables and plots from the result.json files under a dir")
    collect_cmd.add_argument("sweep_dir", type=Path)
    collect_cmd.add_argument("--format", type=_formats, default=("md", "csv"),
                             help=f"comma-separated, of {','.join(FORMATS)} (default md,csv)")
    collect_cmd.add_argument("--no-plots", action="store_true", help="skip the PNG/SVG plots")
    report_cmd = commands.add_parser("wandb-report", help="a W&B Report of a sweep (offline: spec JSON)")
    report_cmd.add_argument("sweep_dir", type=Path, help="a sweep dir, or a wandb_report.json to save (--online)")
    report_cmd.add_argument("--project", default="prunebench")
    report_cmd.add_argument("--entity", default=None, help="W&B entity (online: your default entity)")
    report_cmd.add_argument("--online", action="store_true", help="save the report to W&B (needs wandb login)")
    status_cmd = commands.add_parser("status", help="done / running / failed / missing cells of a sweep")
    status_cmd.add_argument("sweep_dir", type=Path)
    status_cmd.add_argument("--watch", action="store_true", help="live status until every cell has finished")
    status_cmd.add_argument("--interval", type=float, default=5.0, help="seconds between polls (--watch)")
    args = parser.parse_args(argv)
    # a watch is often started beside `python run.py -m`, before the sweep has made its dir and manifest
    waiting = args.command == "status" and args.watch and not (args.sweep_dir / CELLS_FILE).exists()
    spec = args.command == "wandb-report" and args.sweep_dir.is_file()
    if not args.sweep_dir.is_dir() and not waiting and not spec:
        print(f"reports: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    if args.command == "status":
        try:
            if waiting:
                print(f"reports: waiting for the sweep in {args.sweep_dir} to start (it writes {CELLS_FILE})",
                      flush=True)
            else:
                status(args.sweep_dir)
            if args.watch:
                watch(args.sweep_dir, threading.Event(), args.interval, out=lambda text: print(text, flush=True))
            print(render(*status(args.sweep_dir)))
        except FileNotFoundError as exc:
            print(f"reports: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        return 0
    try:
        if args.command == "collect":
            report = collect(args.sweep_dir, formats=args.format, plots=not args.no_plots)
            print(report.markdown)
            print(f"\nwrote {', '.join(str(p.relative_to(args.sweep_dir)) for p in report.written)} "
                  f"into {args.sweep_dir}")
        elif args.sweep_dir.is_file():
            if not args.online:
                print(f"reports: {args.sweep_dir} is a saved spec; --online saves it to W&B", file=sys.stderr)
                return 2
            try:
                print(upload_spec(args.sweep_dir, args.project, args.entity))
            except ValueError as exc:
                print(f"reports: {exc}", file=sys.stderr)
                return 2
        else:
            print(build_report(args.sweep_dir, args.project, args.entity, args.online))
            if not args.online:
                print("offline: the report to read is report.html (python -m reports collect <dir> --format html); "
                      "save this spec to W&B later with: python -m reports wandb-report <spec> --online")
    except FileNotFoundError as exc:
        print(f"reports: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only sweep dir (an archive, a teammate's), a full disk
        tables = args.command == "collect"
        if tables:
            print(collect(args.sweep_dir, write=False).markdown)
        print(f"reports: could not write into {args.sweep_dir} ({exc.strerror or exc}: {exc.filename})"
              + ("; its tables are printed above" if tables else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
