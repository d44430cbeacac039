"""python -m torch_manualgrad demo: the main job. A small CNN built twice — from torch.nn and converted to
our layers, with the same initial weights — trained side by side on scikit-learn's handwritten digits
(1,797 real 8×8 images, shipped with scikit-learn, nothing downloaded)."""
import copy
import time

import torch

from .convert import convert
from . import _cli


def add_parser(commands):
    p = commands.add_parser("demo", help="train a small CNN with torch.nn and with our layers side by side on digits")
    p.add_argument("--epochs", type=_cli.positive_int, default=12)
    p.add_argument("--batch-size", type=_cli.positive_int, default=32)
    p.add_argument("--device", type=_cli.device, default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args):
    return train(epochs=args.epochs, batch_size=args.batch_size, device=args.device, seed=args.seed)


def small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),   # 16×4×4
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # 32×2×2
        torch.nn.Flatten(), torch.nn.Linear(32 * 2 * 2, 10),
    )


def load_digits(device, seed):
    """(train_x, train_y, test_x, test_y): the digits scaled to [0, 1], a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:  # the demo's extra, not a core dependency
        raise SystemExit("the demo needs scikit-learn: pip install 'torch_manualgrad[demo]'") from exc
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return images[train].to(device), labels[train].to(device), images[test].to(device), labels[test].to(device)


def progress(iterable, **kwargs):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, leave=False, **kwargs)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(epochs=12, batch_size=32, device="cpu", seed=0):
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = load_digits(device, seed)
    reference = small_cnn().to(device)
    ours = convert(copy.deepcopy(reference))
    models = {"torch.nn": reference, "torch_manualgrad": ours}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=3e-3) for name, m in models.items()}
    seconds = {name: 0.0 for name in models}
    print(f"digits: {len(train_y)} training and {len(test_y)} test images of 8×8; device {device}")
    worst_loss_gap = 0.0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed + epoch))
        totals = {name: 0.0 for name in models}
        grad_gap = 0.0
        batches = range(0, len(order), batch_size)
        for start in progress(batches, desc=f"epoch {epoch}/{epochs}", unit="batch"):
            idx = order[start:start + batch_size].to(device)
            x, y = train_x[idx], train_y[idx]
            for name, model in models.items():
                began = time.perf_counter()
                optimizers[name].zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizers[name].step()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[name] += time.perf_counter() - began
                totals[name] += loss.item() * len(idx)
            # gradients of this step, compared before the next one overwrites them
            grad_gap = max(grad_gap, max((p.grad - q.grad).abs().max().item()
                                         for p, q in zip(reference.parameters(), ours.parameters())))
        losses = {name: total / len(order) for name, total in totals.items()}
        worst_loss_gap = max(worst_loss_gap, abs(losses["torch.nn"] - losses["torch_manualgrad"]))
        print(f"epoch {epoch:2d}  loss torch.nn {losses['torch.nn']:.5f}  ours {losses['torch_manualgrad']:.5f}"
              f"  largest gradient difference {grad_gap:.2e}")
    acc = {name: accuracy(m, test_x, test_y) for name, m in models.items()}
    for name in models:
        print(f"{name:17s} test accuracy {100 * acc[name]:.1f}%   {1e3 * seconds[name] / epochs:.0f} ms per epoch")
    agree = worst_loss_gap < 1e-3 and abs(acc["torch.nn"] - acc["torch_manualgrad"]) <= 0.01
    print("both models agree" if agree else "MODELS DISAGREE", f"(largest epoch-loss difference {worst_loss_gap:.1e})")
    return 0 if agree and min(acc.values()) > 0.9 else 1
