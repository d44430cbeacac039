"""python -m torch_manualgrad (also the console script torch-manualgrad): demo, verify, check, explain, bench.

Each subcommand lives in its own module with add_parser(subparsers) and run(args) -> exit code. An exception
that escapes a subcommand (a model that does not run on the given shape, a path that cannot be written) is
reported in one line with exit code 2; TORCH_MANUALGRAD_TRACEBACK=1 lets it through with its traceback.
"""
import argparse
import importlib
import os
import sys

SUBCOMMANDS = {
    "demo": "torch_manualgrad.demo",
    "verify": "torch_manualgrad.verify",
    "check": "torch_manualgrad.check",
    "explain": "torch_manualgrad.explain",
    "bench": "torch_manualgrad.bench",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="torch-manualgrad", description="Hand-written conv and max-pool for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # not written yet
        modules[name].add_parser(commands)
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args)
    except Exception as exc:  # a user's model, shape or path that does not work: one line, not a traceback
        if os.environ.get("TORCH_MANUALGRAD_TRACEBACK", "0") not in ("", "0"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"torch-manualgrad {args.command}: error: {type(exc).__name__}: {first}", file=sys.stderr)
        print("(TORCH_MANUALGRAD_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
