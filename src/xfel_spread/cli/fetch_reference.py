"""``spread-fetch-reference``: obtain verified copies of reference files (mirror copy or download).

Example: ``spread-fetch-reference --dest resources/reference --mirror ../shared/data 1m2a.pdb Fe.dat``
"""

from __future__ import annotations

import argparse
import sys

from xfel_spread.cli.common import run_command
from xfel_spread.reference import REFERENCE_FILES, REFERENCE_NAMES, fetch_reference


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface definition."""
    parser = argparse.ArgumentParser(
        prog="spread-fetch-reference",
        description="Copy (from a mirror) or download reference files, verify their sha256, "
        "and write them atomically into DEST.",
        epilog="known files: "
        + "; ".join(f"{name} ({entry.description})" for name, entry in REFERENCE_FILES.items()),
    )
    parser.add_argument("--dest", required=True, metavar="DIR", help="directory to write the files into")
    parser.add_argument(
        "--mirror", metavar="DIR", help="local directory holding the files; without it they are downloaded"
    )
    parser.add_argument("names", nargs="+", metavar="NAME", choices=REFERENCE_NAMES, help="reference file name")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Fetch each named file; print one line per file, or one error line and return 1."""
    arguments = build_parser().parse_args(argv)
    origin = f"mirror {arguments.mirror}" if arguments.mirror else "public source"

    def action():
        for name in arguments.names:
            path = fetch_reference(name, arguments.dest, mirror_dir=arguments.mirror)
            print(f"{path}: verified ({origin})")

    return run_command("spread-fetch-reference", action)


if __name__ == "__main__":
    sys.exit(main())
