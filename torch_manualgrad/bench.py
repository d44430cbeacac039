"""`python -m torch_manualgrad bench [options]`: runs the repository's benchmarks/bench.py, options passed through.

    python -m torch_manualgrad bench --quick --only pool
    python -m torch_manualgrad bench --help        # bench.py's own options
    python -m torch_manualgrad bench models --quick  # bench.py hands over to benchmarks/model_bench.py

The benchmark script lives in the source checkout, next to the package, not inside it: an installed
(non-editable) package has no benchmarks/ directory, and then this command says so and exits with 2.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

__all__ = ["bench_script", "load_script", "add_parser", "run"]


def bench_script():
    """Where benchmarks/bench.py is expected: the repository root is the package directory's parent."""
    return Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


class _PassThroughParser(argparse.ArgumentParser):
    """A subcommand parser that takes every remaining argument, options included, as bench.py's argv.

    (A positional with nargs=argparse.REMAINDER does not work here: argparse treats a leading
    "--quick" as an unknown option of ours and fails before the remainder is collected.)
    """

    def parse_known_args(self, args=None, namespace=None):
        namespace = argparse.Namespace() if namespace is None else namespace
        namespace.bench_argv = list(sys.argv[1:] if args is None else args)
        return namespace, []


def add_parser(commands):
    p = commands.add_parser(
        "bench", add_help=False,
        help="benchmark our ops against torch's (benchmarks/bench.py; options passed through, see bench --help); "
             "bench models [...]: whole networks, converted vs torch.nn (see bench models --help)",
    )
    p.__class__ = _PassThroughParser
    return p


def load_script(path):
    """A benchmarks/*.py file as a module, loaded by its path (benchmarks/ is no package, and the scripts
    load each other this way too: model_bench.py uses bench.py's timing and models.py's builders). Loaded
    once per process under the name torch_manualgrad_benchmarks_<stem>; a file of that name elsewhere
    is loaded afresh."""
    path = Path(path).resolve()
    name = f"torch_manualgrad_benchmarks_{path.stem}"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


def run(args):
    path = bench_script()
    if not path.is_file():
        print(
            f"bench: the benchmark script is not here ({path}).\n"
            "It ships with the source repository, not with an installed package: run this from a source "
            "checkout (e.g. an editable install, pip install -e .), or run benchmarks/bench.py there directly.",
            file=sys.stderr,
        )
        return 2
    module = load_script(path)
    argv = list(getattr(args, "bench_argv", []))
    saved_argv0 = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = "torch-manualgrad bench"  # what bench.py's --help and usage errors call the program
    try:
        code = module.main(argv)
    except SystemExit as exc:  # --help, a usage error, or bench.py's own sys.exit("message")
        code = exc.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    finally:
        if saved_argv0 is not None:
            sys.argv[0] = saved_argv0
    return 0 if code is None else int(code)
