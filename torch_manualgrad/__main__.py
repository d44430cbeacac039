"""python -m torch_manualgrad (also the console script torch-manualgrad): demo, verify, check, explain, bench.

Each subcommand lives in its own module with add_parser(subparsers) and run(args) -> exit code.
"""
import argparse
import importlib
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
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
