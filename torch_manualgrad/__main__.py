"""python -m torch_manualgrad demo: a short end-to-end run of the package (see demo.py)."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="torch_manualgrad", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small CNN with torch.nn and with our layers side by side")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(steps=args.steps, device=args.device)
    return 2


if __name__ == "__main__":
    sys.exit(main())
