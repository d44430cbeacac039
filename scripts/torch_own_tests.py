"""scripts/torch_own_tests.py — runs PyTorch's own convolution and pooling tests with our functions in
place of torch.nn.functional's, on the CPU, and summarises which of the tests that reach them pass.

A developer's check, not part of `make test` (CI cannot download PyTorch's tests). Give it a PyTorch
checkout, ideally at the commit of the installed torch (`python -c "import torch; print(torch.version.git_version)"`):

    .venv/bin/python scripts/torch_own_tests.py ~/pytorch            # test/nn/test_convolution.py, test_pooling.py
    .venv/bin/python scripts/torch_own_tests.py ~/pytorch -k same_padding --verbose
    .venv/bin/python scripts/torch_own_tests.py ~/pytorch --unpatched  # torch's own functions: the baseline

PyTorch's test helpers (torch.testing._internal) need `pip install expecttest`, and scipy for the tests that
compare with it. torch.nn.functional's conv1d, conv2d, max_pool1d, max_pool2d (and the *_with_indices forms) are replaced for
the whole run; torch.nn's Conv1d/Conv2d/MaxPool1d/MaxPool2d call those names at run time, so modules
reach ours too. A test counts when it called one of them at least once; the others (conv3d, transposed
convolutions, average pooling, cuDNN-only tests, ...) are run but left out of the summary.
"""
import argparse
import collections
import functools
import json
import os
import sys
from pathlib import Path

DEFAULT_FILES = ("test/nn/test_convolution.py", "test/nn/test_pooling.py")


class Recorder:
    """A pytest plugin: replaces the functions, notes per test whether ours ran, and keeps each outcome."""

    def __init__(self, patch):
        self.patch = patch
        self.called = False
        self.results = {}  # nodeid -> (outcome, called ours, first line of the error)

    def _counting(self, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            self.called = True
            return function(*args, **kwargs)

        return wrapper

    def pytest_configure(self, config):
        import torch.nn.functional as F

        if self.patch:
            import torch_manualgrad.functional as ours

            replacements = {
                "conv1d": ours.conv1d,
                "conv2d": ours.conv2d,
                "max_pool1d": ours.max_pool1d,
                "max_pool2d": ours.max_pool2d,
                "max_pool1d_with_indices": functools.partial(ours.max_pool1d, return_indices=True),
                "max_pool2d_with_indices": functools.partial(ours.max_pool2d, return_indices=True),
            }
        else:  # the same bookkeeping around torch's own functions
            names = ("conv1d", "conv2d", "max_pool1d", "max_pool2d", "max_pool1d_with_indices", "max_pool2d_with_indices")
            replacements = {name: getattr(F, name) for name in names}
        for name, function in replacements.items():
            setattr(F, name, self._counting(function))

    def pytest_runtest_setup(self, item):
        self.called = False

    def pytest_runtest_logreport(self, report):
        error = ""
        if report.failed and report.longrepr is not None:
            crash = getattr(report.longrepr, "reprcrash", None)
            error = (crash.message if crash is not None else str(report.longrepr)).strip().splitlines()
            error = error[0][:300] if error else ""
        previous = self.results.get(report.nodeid)
        if report.when == "call" or report.failed or (report.when == "setup" and report.skipped):
            outcome = "failed" if report.failed else "skipped" if report.skipped else "passed"
            if previous is not None and previous[0] == "failed":
                return  # a teardown error must not hide the call's failure
            self.results[report.nodeid] = (outcome, self.called or (previous is not None and previous[1]), error)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a PyTorch source checkout (its test/nn/ folder is what is read)")
    parser.add_argument("--files", nargs="*", default=DEFAULT_FILES, help="test files, relative to the checkout")
    parser.add_argument("-k", default=None, help="pytest -k expression, to run some tests only")
    parser.add_argument("--unpatched", action="store_true", help="run torch's own functions (the baseline)")
    parser.add_argument("--verbose", action="store_true", help="list every counted test, not only the failures")
    parser.add_argument("--json", type=Path, help="write every test's outcome here")
    args = parser.parse_args()

    import pytest

    paths = [str(args.checkout / f) for f in args.files]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    # PyTorch's test helpers read the device list and their own flags at import: only the CPU, and no
    # pytest arguments mistaken for theirs.
    os.environ.setdefault("PYTORCH_TESTING_DEVICE_ONLY_FOR", "cpu")
    sys.argv = sys.argv[:1]
    recorder = Recorder(patch=not args.unpatched)
    # --noconftest: PyTorch's test/conftest.py wants its CI's plugins; the tests themselves do not.
    pytest_args = ["-q", "-p", "no:cacheprovider", "--noconftest", "-o", "addopts=", *paths]
    if args.k:
        pytest_args += ["-k", args.k]
    pytest.main(pytest_args, plugins=[recorder])

    counted = {k: v for k, v in recorder.results.items() if v[1]}
    tally = collections.Counter(outcome for outcome, _, _ in counted.values())
    print()
    print(f"{'torch' if args.unpatched else 'torch_manualgrad'} in torch.nn.functional: "
          f"{len(counted)} tests called conv1d/conv2d/max_pool1d/max_pool2d "
          f"({len(recorder.results) - len(counted)} others ran without them)")
    print(f"  passed {tally['passed']}, failed {tally['failed']}, skipped {tally['skipped']}")
    for nodeid, (outcome, _, error) in sorted(counted.items()):
        if outcome == "failed" or args.verbose:
            print(f"  {outcome.upper():7} {nodeid.split('::', 1)[1]}" + (f"\n          {error}" if error else ""))
    if args.json:
        args.json.write_text(json.dumps({k: {"outcome": o, "called": c, "error": e}
                                         for k, (o, c, e) in recorder.results.items()}, indent=1))
    return 1 if tally["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
