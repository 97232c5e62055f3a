"""Trains GALA against cross-entropy on a synthetic long-tailed problem (``python -m gala_kernels demo``).

The problem (all of it from one seed):

- ``C`` Gaussian class clusters in ``dim`` dimensions: class means ``mu_k ~ N(0, separation^2 I)``,
  samples ``x = mu_y + N(0, I)``;
- training counts from the standard exponential profile ``n_k = floor(n_max * IF^(-k/(C-1)))``
  (at least 1), ``IF`` = ``--imbalance``;
- a balanced validation split (used only to fit the re-balancing ``tau``) and a balanced test set.

The same small model (an MLP ``dim -> hidden -> C`` with ReLU; above 1000 classes by default a
linear classifier ``dim -> C``, cheaper and enough for Gaussian clusters) is trained from the same
initialisation and on the same batches twice: with ``F.cross_entropy``, then with
:class:`gala_kernels.GALALoss` (SGD, momentum 0.9, weight decay 5e-4, cosine schedule). The
test set is scored three ways: CE, GALA, and GALA + re-balancing
(``argmax_j z_ij - tau * log(mass_j)``, docs/rebalancing.md, ``tau`` fitted on the validation split).
Accuracies are balanced (the test set is), overall and per shot group (many > 100 training
samples, medium 20..100, few < 20). It also times a GALA training step with the fused backend
(``backend="auto"``) against the eager reference (``backend="torch"``) side by side.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .benchmark.machine import machine_info
from .loss import GALALoss
from .metrics import lt_accuracy
from .rebalance import PredictionRebalancer, fit_tau

SMALL_MAX_CLASSES = 1000  # above this, the "large" defaults keep memory and time in bounds


@dataclass
class Config:
    classes: int
    imbalance: float
    n_max: int
    dim: int
    model: str
    hidden: int
    separation: float
    val_per_class: int
    test_per_class: int
    epochs: int
    batch: int
    lr: float
    lambda1: float
    lambda2: float
    seed: int
    timing_steps: int


def default_config(args: argparse.Namespace) -> Config:
    """Defaults by problem size; every field can be overridden on the command line."""
    classes = args.classes or (50 if args.quick else 100)
    large = classes > SMALL_MAX_CLASSES
    defaults = dict(
        n_max=100 if large else 500,
        dim=64 if large else 32,
        model="linear" if large else "mlp",
        lr=2.0 if large else 0.05,  # the linear model at large C learns too slowly at 0.05
        epochs=(1 if large else 8) if args.quick else (3 if large else 20),
        batch=512 if large else 128,
        val_per_class=max(2, min(20, 20_000 // classes)),
        test_per_class=max(5, min(50, 50_000 // classes)),
        timing_steps=20 if args.quick else 50,
    )
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    return Config(classes=classes, imbalance=args.imbalance, hidden=args.hidden, separation=args.separation,
                  lambda1=args.lambda1, lambda2=args.lambda2, seed=args.seed, **chosen)


# ---------------------------------------------------------------- data

def exponential_profile(classes: int, n_max: int, imbalance: float) -> torch.Tensor:
    """``n_k = floor(n_max * IF^(-k/(C-1)))``, at least 1 (int64, ``(C,)``)."""
    if classes == 1:
        return torch.tensor([n_max], dtype=torch.int64)
    k = torch.arange(classes, dtype=torch.float64)
    counts = torch.floor(n_max * imbalance ** (-k / (classes - 1)))
    return counts.clamp(min=1).to(torch.int64)


@dataclass
class Problem:
    train_counts: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_problem(cfg: Config) -> Problem:
    generator = torch.Generator().manual_seed(cfg.seed)
    means = torch.randn(cfg.classes, cfg.dim, generator=generator) * cfg.separation

    def sample(per_class: torch.Tensor):
        labels = torch.repeat_interleave(torch.arange(cfg.classes), per_class)
        return means[labels] + torch.randn(labels.numel(), cfg.dim, generator=generator), labels

    counts = exponential_profile(cfg.classes, cfg.n_max, cfg.imbalance)
    x_train, y_train = sample(counts)
    x_val, y_val = sample(torch.full((cfg.classes,), cfg.val_per_class))
    x_test, y_test = sample(torch.full((cfg.classes,), cfg.test_per_class))
    return Problem(counts, x_train, y_train, x_val, y_val, x_test, y_test)


# ---------------------------------------------------------------- training

def make_model(cfg: Config) -> nn.Module:
    """``mlp``: dim -> hidden -> C with ReLU; ``linear``: dim -> C (the Bayes classifier of Gaussian
    clusters with a shared covariance is linear, so it suffices and is cheap at large C)."""
    torch.manual_seed(cfg.seed)
    if cfg.model == "linear":
        return nn.Sequential(nn.Linear(cfg.dim, cfg.classes))
    return nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.classes))


def batch_order(cfg: Config, num_train: int) -> List[torch.Tensor]:
    """The minibatch indices of every epoch, the same for every model trained."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    order = []
    for _ in range(cfg.epochs):
        order.extend(torch.randperm(num_train, generator=generator).split(cfg.batch))
    return order


class Trainer:
    """SGD (momentum 0.9, weight decay 5e-4, cosine schedule over ``total_steps``) of one model."""

    def __init__(self, model: nn.Module, criterion: nn.Module, problem: Problem, cfg: Config,
                 total_steps: int):
        self.model, self.criterion, self.problem = model, criterion, problem
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps)
        model.train()
        criterion.train()

    def step(self, index: torch.Tensor) -> float:
        """One training step on the rows ``index``; returns its wall time in ms."""
        started = time.perf_counter()
        loss = self.criterion(self.model(self.problem.x_train[index]), self.problem.y_train[index])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return (time.perf_counter() - started) * 1e3

    def finish(self) -> nn.Module:
        self.model.eval()
        self.criterion.eval()
        return self.model


def train(model: nn.Module, criterion: nn.Module, problem: Problem, batches: List[torch.Tensor], cfg: Config,
          progress=None) -> float:
    """Train on ``batches`` in order; returns the median ms per step."""
    trainer = Trainer(model, criterion, problem, cfg, len(batches))
    step_ms = []
    for index in batches:
        step_ms.append(trainer.step(index))
        if progress is not None:
            progress.update(1)
    trainer.finish()
    return statistics.median(step_ms)


class CrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)


def gala_criterion(cfg: Config, backend: str) -> GALALoss:
    return GALALoss(cfg.classes, lambda1=cfg.lambda1, lambda2=cfg.lambda2, backend=backend)


def time_gala_backends(initial: nn.Module, problem: Problem, batches: List[torch.Tensor],
                       cfg: Config) -> Dict[str, Dict[str, float]]:
    """Median ms of a whole GALA training step, and of the loss alone (forward + backward on the
    logits), with the fused backend ("auto") and the eager reference ("torch"): the same batches
    from the same initial weights, the two backends' steps interleaved so that both see the same
    machine load."""
    steps = batches[: cfg.timing_steps]
    names = ("auto", "torch")
    trainers = {
        b: Trainer(copy.deepcopy(initial), gala_criterion(cfg, b), problem, cfg, len(steps)) for b in names
    }
    step_ms: Dict[str, List[float]] = {b: [] for b in names}
    loss_ms: Dict[str, List[float]] = {b: [] for b in names}
    for index in steps:
        for backend in names:
            step_ms[backend].append(trainers[backend].step(index))
    for index in steps:
        for backend in names:
            trainer = trainers[backend]
            with torch.no_grad():
                logits = trainer.model(problem.x_train[index])
            logits.requires_grad_(True)
            started = time.perf_counter()
            trainer.criterion(logits, problem.y_train[index]).backward()
            loss_ms[backend].append((time.perf_counter() - started) * 1e3)
    return {
        backend: {
            "backend": _resolved_backend(problem) if backend == "auto" else backend,
            "train_step_ms": statistics.median(step_ms[backend]),
            "loss_ms": statistics.median(loss_ms[backend]),
            "steps": len(steps),
        }
        for backend in names
    }


def _resolved_backend(problem: Problem) -> str:
    from . import backends

    return backends.resolve("auto", problem.x_train[:1])


# ---------------------------------------------------------------- evaluation

EVAL_ROWS = 8192  # logits are computed (and re-balanced) in chunks of rows


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(chunk) for chunk in x.split(EVAL_ROWS)])


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, rebalancer: Optional[PredictionRebalancer] = None):
    """Plain argmax, or with a rebalancer: stream the mass over the evaluation set, then predict."""
    if rebalancer is None:
        return torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(EVAL_ROWS)])
    rebalancer.reset()
    for chunk in x.split(EVAL_ROWS):
        rebalancer.update(model(chunk))
    return torch.cat([rebalancer.predict(model(chunk)) for chunk in x.split(EVAL_ROWS)])


def summarise(accuracy: Dict) -> Dict:
    per_class = accuracy["per_class"]
    return {k: float(accuracy[k]) for k in ("overall", "many", "medium", "few")} | {
        "per_class": [float(v) for v in per_class.tolist()]
    }


# ---------------------------------------------------------------- output

def results_table(results: Dict[str, Dict], counts: torch.Tensor) -> str:
    groups = {"many": int((counts > 100).sum()), "medium": int(((counts >= 20) & (counts <= 100)).sum()),
              "few": int((counts < 20).sum())}
    lines = [f"| method | overall (balanced) | many ({groups['many']}) | medium ({groups['medium']}) "
             f"| few ({groups['few']}) |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        cells = " | ".join("-" if math.isnan(r[k]) else f"{100 * r[k]:.2f}"
                           for k in ("overall", "many", "medium", "few"))
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def timing_table(timing: Dict[str, Dict[str, float]]) -> str:
    fused, eager = timing["auto"], timing["torch"]
    lines = ["| GALA step | fused (backend='auto' -> '{}') | eager (backend='torch') | speed-up |".format(
        fused["backend"]), "|---|---:|---:|---:|"]
    rows = (("train_step_ms", "whole training step, ms"), ("loss_ms", "loss forward + backward, ms"))
    for key, name in rows:
        lines.append(f"| {name} | {fused[key]:.3f} | {eager[key]:.3f} | {eager[key] / fused[key]:.2f}x |")
    return "\n".join(lines)


def plot(results: Dict[str, Dict], counts: torch.Tensor, path: str, title: str) -> Optional[str]:
    """Per-class test accuracy against training frequency: points and a running mean per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    order = torch.argsort(counts, descending=True, stable=True)
    x = counts[order].tolist()
    window = max(1, len(x) // 20)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (name, r), color in zip(results.items(), ("tab:gray", "tab:blue", "tab:orange")):
        y = torch.tensor(r["per_class"], dtype=torch.float64)[order]
        ax.scatter(x, y.tolist(), s=8, alpha=0.25, color=color)
        running = [float(y[max(0, i - window): i + window + 1].nanmean()) for i in range(len(x))]
        ax.plot(x, running, color=color, linewidth=2, label=f"{name} ({100 * r['overall']:.1f}% balanced)")
    for boundary in (20, 100):  # shot groups: few < 20 <= medium <= 100 < many
        ax.axvline(boundary, color="black", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("training samples of the class")
    ax.set_ylabel("test accuracy of the class")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


class _Progress:
    """tqdm over the training steps when installed, else nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, desc="training")
            except ImportError:
                pass

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, default=None, help="C (default 100; 50 with --quick)")
    parser.add_argument("--imbalance", type=float, default=100.0, help="imbalance factor IF = n_max / n_min")
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute on a 2-core CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, metavar="DIR", help="write demo.json and demo.png here")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--n-max", type=int, default=None, help="training samples of the largest class")
    parser.add_argument("--dim", type=int, default=None, help="feature dimension")
    parser.add_argument("--model", choices=("mlp", "linear"), default=None,
                        help="classifier (default: mlp up to 1000 classes, linear above)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden width of the MLP")
    parser.add_argument("--separation", type=float, default=0.5,
                        help="std of the class means (the noise std is 1)")
    parser.add_argument("--val-per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.05; 2.0 above "
                        "1000 classes)")
    parser.add_argument("--lambda1", type=float, default=1.2)
    parser.add_argument("--lambda2", type=float, default=0.9)
    parser.add_argument("--timing-steps", type=int, default=None, help="steps timed for fused vs eager")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> Dict:
    started = time.perf_counter()
    cfg = default_config(args)
    problem = make_problem(cfg)
    batches = batch_order(cfg, problem.y_train.numel())
    counts = problem.train_counts
    print(f"Synthetic long-tailed problem: C = {cfg.classes}, IF = {cfg.imbalance:g}, "
          f"{problem.y_train.numel():,} training samples "
          f"({int(counts[0])} down to {int(counts[-1])} per class), "
          f"balanced validation {problem.y_val.numel():,} and test {problem.y_test.numel():,}; "
          f"{cfg.epochs} epochs of {len(batches) // cfg.epochs} steps, batch {cfg.batch}.")

    initial = make_model(cfg)
    progress = _Progress(2 * len(batches), enabled=not args.no_progress)
    progress.describe("training with cross-entropy")
    ce_model = copy.deepcopy(initial)
    ce_step_ms = train(ce_model, CrossEntropy(), problem, batches, cfg, progress)
    progress.describe("training with GALA")
    gala_model, gala_loss = copy.deepcopy(initial), gala_criterion(cfg, "auto")
    gala_step_ms = train(gala_model, gala_loss, problem, batches, cfg, progress)
    progress.close()

    tau, tau_table = fit_tau(logits_of(gala_model, problem.x_val), problem.y_val)
    scored = {
        "CE": predictions(ce_model, problem.x_test),
        "GALA": predictions(gala_model, problem.x_test),
        "GALA + re-balancing": predictions(
            gala_model, problem.x_test, PredictionRebalancer(cfg.classes, tau)),
    }
    results = {name: summarise(lt_accuracy(preds, problem.y_test, counts)) for name, preds in scored.items()}
    timing = time_gala_backends(initial, problem, batches, cfg)

    print("\nTest accuracy, % (balanced test set; shot groups by training samples, classes in brackets):\n")
    print(results_table(results, counts))
    gain = 100 * (results["GALA"]["overall"] - results["CE"]["overall"])
    print(f"\nGALA - CE, balanced accuracy: {gain:+.2f} points; re-balancing tau fitted on the "
          f"validation split: {tau:g}")
    print(f"\nTraining time per step, median of {min(cfg.timing_steps, len(batches))} steps "
          f"(model + loss + backward + SGD), same batches:\n")
    print(timing_table(timing))

    output = {
        "meta": machine_info(torch.device("cpu")),
        "config": asdict(cfg),
        "train_class_counts": counts.tolist(),
        "results": results,
        "tau": tau,
        "tau_table": {str(k): v for k, v in tau_table.items()},
        "median_train_step_ms": {"CE": ce_step_ms, "GALA (fused)": gala_step_ms},
        "gala_step_timing": timing,
    }
    output["meta"]["total_seconds"] = round(time.perf_counter() - started, 1)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        title = f"C = {cfg.classes}, imbalance {cfg.imbalance:g}, seed {cfg.seed}; re-balancing tau = {tau:g}"
        problem_text = plot(results, counts, os.path.join(args.out, "demo.png"), title)
        if problem_text is not None:
            output["plot"] = f"not written: {problem_text}"
        with open(os.path.join(args.out, "demo.json"), "w") as f:
            json.dump(output, f, indent=2)
        print(f"\nwrote {os.path.join(args.out, 'demo.json')}"
              + ("" if problem_text else f" and {os.path.join(args.out, 'demo.png')}"))
    return output


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="gala-kernels demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
