"""The end-to-end demo: a small CNN built from torch.nn, a copy converted to our layers, both trained
side by side on the same synthetic batches; prints that losses and gradients agree."""
import copy
import time

import torch

from .convert import convert


def small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding="same"), torch.nn.ReLU(), torch.nn.MaxPool2d(3, stride=2, padding=1),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10),
    )


def run(steps=20, device="cpu", seed=0):
    torch.manual_seed(seed)
    reference = small_cnn().to(device)
    ours = convert(copy.deepcopy(reference))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (reference, ours)]
    # Synthetic task: the class is which of ten 4×4 cells of a 16×16 image holds a bright blob.
    worst_grad, worst_loss, seconds = 0.0, 0.0, [0.0, 0.0]
    for step in range(steps):
        labels = torch.randint(0, 10, (32,), device=device)
        images = 0.3 * torch.randn(32, 1, 16, 16, device=device)
        for k, c in enumerate(labels.tolist()):
            images[k, 0, 4 * (c // 4):4 * (c // 4) + 4, 4 * (c % 4):4 * (c % 4) + 4] += 1.0
        losses = []
        for i, (model, opt) in enumerate(zip((reference, ours), opts)):
            start = time.perf_counter()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            seconds[i] += time.perf_counter() - start
            losses.append(loss)
        grad_diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(reference.parameters(), ours.parameters()))
        worst_grad = max(worst_grad, grad_diff)
        worst_loss = max(worst_loss, abs(losses[0].item() - losses[1].item()))
        for opt in opts:
            opt.step()
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss torch.nn {losses[0].item():.5f}  ours {losses[1].item():.5f}  "
                  f"max |grad diff| {grad_diff:.2e}")
    agree = worst_loss < 1e-4 and worst_grad < 1e-3
    print(f"time forward+backward: torch.nn {seconds[0] * 1e3 / steps:.1f} ms/step, ours {seconds[1] * 1e3 / steps:.1f} ms/step")
    print(f"largest loss difference {worst_loss:.2e}, largest gradient difference {worst_grad:.2e}: "
          + ("both models agree" if agree else "MODELS DISAGREE"))
    return 0 if agree else 1
