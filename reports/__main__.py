"""python -m reports collect <sweep dir>: print the table and write table.md / table.csv there.
python -m reports status <sweep dir>: done / running / failed / missing cells of a sweep."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.collect import collect


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports")
    commands = parser.add_subparsers(dest="command", required=True)
    collect_cmd = commands.add_parser("collect", help="tables from the result.json files under a dir")
    collect_cmd.add_argument("sweep_dir", type=Path)
    status_cmd = commands.add_parser("status", help="done / running / failed / missing cells of a sweep")
    status_cmd.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"reports: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    if args.command == "status":
        from reports.status import render, status

        try:
            print(render(status(args.sweep_dir)))
        except FileNotFoundError as exc:
            print(f"reports: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        table = collect(args.sweep_dir)
    except FileNotFoundError as exc:
        print(f"reports: {exc}", file=sys.stderr)
        return 2
    print(table.markdown)
    print(f"\nwrote {args.sweep_dir / 'table.md'} and {args.sweep_dir / 'table.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
