"""``python -m duca_compile.conformance [family ...] [--write docs/models.md]``"""
import argparse
import warnings

from . import EXPECTED, check, matrix, write_readme


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run the conformance checks and print the support matrix.")
    parser.add_argument("families", nargs="*", help="families to check (default: all)")
    parser.add_argument("--write", "--readme", dest="write", metavar="FILE",
                        help="rewrite the matrix between the conformance markers of FILE (docs/models.md)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    table = matrix([check(f) for f in (args.families or list(EXPECTED))])
    print(table)
    if args.write:
        write_readme(args.write, table)


if __name__ == "__main__":
    main()
