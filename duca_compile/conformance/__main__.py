"""``python -m duca_compile.conformance [family ...] [--readme README.md]``"""
import argparse
import warnings

from . import EXPECTED, check, matrix, write_readme


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run the conformance checks and print the support matrix.")
    parser.add_argument("families", nargs="*", help="families to check (default: all)")
    parser.add_argument("--readme", help="rewrite the matrix between the conformance markers of this file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    table = matrix([check(f) for f in (args.families or list(EXPECTED))])
    print(table)
    if args.readme:
        write_readme(args.readme, table)


if __name__ == "__main__":
    main()
