"""Train a long-tailed classifier with GALA: a script to adapt to your own data and model.

Data (one of):
  --data-root DIR      CIFAR-100-LT built from a local CIFAR-100 copy (DIR/cifar-100-python, the
                       folder torchvision downloads; read directly, nothing is downloaded) with the
                       standard exponential split n_k = n_max * IF^(-k/(C-1)), --imbalance IF; ResNet-32.
  --features FILE      decoupled classifier re-training on frozen features: a .pt file holding
                       {"features": (N, D), "labels": (N,)}, or a .npy / .npz of features (with
                       --labels FILE.npy, or an .npz with arrays "features" and "labels").
  (neither)            synthetic long-tailed Gaussian clusters (--num-classes, --dim, --imbalance).

Loss (--loss):
  gala                 logits = model(x); GALALoss (the state lives in the criterion)
  fused-linear         fused_linear_gala_ce(features, head.weight, labels, state, head.bias): the
                       (B, C) logits are never materialised (large C)

Single process:  python examples/train.py --steps 2000
Several GPUs:    torchrun --nproc_per_node 4 examples/train.py --steps 2000
                 (DDP; the GALA statistics are summed over ranks, so every rank holds the state
                 of the global batch; --batch-size is per rank)

Checkpoints (--checkpoint-dir, every --checkpoint-every steps and at the end) hold the model,
optimizer, GALA state, RNG states and step; --resume continues a run exactly (same weights and
GALA state as an uninterrupted run). The data order and augmentation are functions of
(--seed, step, rank), so they resume exactly too.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gala_kernels as gk
from gala_kernels.linear import fused_linear_gala_ce

CHECKPOINT_NAME = "checkpoint.pt"


# ----------------------------------------------------------------------------- data
class Dataset:
    """In-memory tensors: ``x`` (N, ...), ``y`` (N,) int64; ``test`` another Dataset or None."""

    def __init__(self, x, y, num_classes, test=None, augment=False):
        self.x, self.y, self.num_classes, self.test, self.augment = x, y, num_classes, test, augment

    def class_counts(self):
        return torch.bincount(self.y, minlength=self.num_classes)


def exponential_profile(num_classes: int, n_max: int, imbalance: float):
    """The standard long-tailed split: class k keeps n_max * IF^(-k/(C-1)) samples."""
    if num_classes == 1:
        return [n_max]
    return [int(n_max * imbalance ** (-k / (num_classes - 1))) for k in range(num_classes)]


def load_cifar100_lt(root: str, imbalance: float, seed: int = 0) -> Dataset:
    """CIFAR-100-LT from ``root/cifar-100-python/{train,test}`` (the python pickle format)."""
    folder = Path(root) / "cifar-100-python"
    if not (folder / "train").is_file():
        raise FileNotFoundError(
            f"no CIFAR-100 copy at {folder} (expected the files 'train' and 'test' of the python "
            "version, e.g. as torchvision.datasets.CIFAR100(root, download=True) leaves them); "
            "this script never downloads"
        )

    def read(name):
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images = torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        return images, torch.tensor(entry["fine_labels"], dtype=torch.int64)

    train_x, train_y = read("train")
    test_x, test_y = read("test")
    num_classes = 100
    per_class = [torch.nonzero(train_y == k).flatten() for k in range(num_classes)]
    n_max = max(len(i) for i in per_class)
    rng = np.random.RandomState(seed)  # which samples of each class are kept (LDAM-style)
    keep = []
    for k, n_k in enumerate(exponential_profile(num_classes, n_max, imbalance)):
        order = torch.from_numpy(rng.permutation(len(per_class[k])))
        keep.append(per_class[k][order[: min(n_k, len(per_class[k]))]])
    keep = torch.cat(keep)

    mean = torch.tensor([0.507, 0.487, 0.441]).view(1, 3, 1, 1)
    std = torch.tensor([0.267, 0.256, 0.276]).view(1, 3, 1, 1)
    normalise = lambda images: (images.float() / 255.0 - mean) / std
    test = Dataset(normalise(test_x), test_y, num_classes)
    return Dataset(normalise(train_x[keep]), train_y[keep], num_classes, test=test, augment=True)


def load_features(path: str, labels_path: str | None) -> Dataset:
    """Frozen features for classifier re-training: .pt {"features", "labels"}, .npz, or .npy + labels."""
    suffix = Path(path).suffix
    if suffix == ".pt":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        features, labels = blob["features"], blob["labels"]
    elif suffix == ".npz":
        blob = np.load(path)
        features, labels = torch.from_numpy(blob["features"]), torch.from_numpy(blob["labels"])
    elif suffix == ".npy":
        if labels_path is None:
            raise ValueError("a .npy features file needs --labels LABELS.npy")
        features, labels = torch.from_numpy(np.load(path)), torch.from_numpy(np.load(labels_path))
    else:
        raise ValueError(f"--features must be a .pt, .npz or .npy file, got {path}")
    features, labels = features.float(), labels.long()
    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    return Dataset(features, labels, int(labels.max()) + 1)


def synthetic_long_tailed(num_classes: int, dim: int, n_max: int, imbalance: float, seed: int) -> Dataset:
    """Gaussian clusters (one mean per class) with an exponential class profile; balanced test set."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=g) * 2.0 / math.sqrt(dim) * 2

    def sample(counts):
        y = torch.cat([torch.full((n,), k, dtype=torch.int64) for k, n in enumerate(counts)])
        return means[y] + torch.randn(len(y), dim, generator=g), y

    counts = [max(n, 1) for n in exponential_profile(num_classes, n_max, imbalance)]
    test_x, test_y = sample([max(n_max // 10, 1)] * num_classes)
    x, y = sample(counts)
    return Dataset(x, y, num_classes, test=Dataset(test_x, test_y, num_classes))


def batch_indices(step: int, n: int, batch_size: int, rank: int, world: int, seed: int):
    """Rows of ``step`` for ``rank``: epoch permutations seeded by (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have seen."""
    global_batch = batch_size * world
    steps_per_epoch = max(n // global_batch, 1)
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = within * global_batch + rank * batch_size
    return order[start: start + batch_size]


def augment(images, step: int, rank: int, seed: int):
    """Random crop (padding 4) and horizontal flip, drawn from a generator seeded by (seed, step, rank)."""
    g = torch.Generator().manual_seed((seed * 7_919 + step) * 131 + rank)
    B = images.shape[0]
    padded = F.pad(images, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (B,), generator=g), torch.randint(0, 9, (B,), generator=g)
    flip = torch.rand(B, generator=g) < 0.5
    out = torch.stack([padded[i, :, dy[i]: dy[i] + 32, dx[i]: dx[i] + 32] for i in range(B)])
    return torch.where(flip.view(B, 1, 1, 1), out.flip(3), out)


# ----------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet32_backbone():
    """The CIFAR ResNet-32 of the GALA recipe (3 stages of 5 blocks, 16/32/64 channels): 64-d features."""
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for block in range(5):
            layers.append(BasicBlock(cin, cout, stride if block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 64


class Classifier(nn.Module):
    """``backbone`` then a linear ``head``; ``forward(x, features_only=True)`` stops before the head
    (for ``fused_linear_gala_ce``, which applies the head itself)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(feature_dim, num_classes)

    def forward(self, x, features_only: bool = False):
        features = self.backbone(x)
        return features if features_only else self.head(features)


# ----------------------------------------------------------------------------- distributed
def setup_distributed(device_arg: str):
    """(rank, world, device); initialises torch.distributed under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device_arg)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ----------------------------------------------------------------------------- checkpoints
def rng_states():
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, step, model, optimizer, gala_state, args):
    blob = dict(step=step, model=model.state_dict(), optimizer=optimizer.state_dict(),
                gala_state=gala_state.state_dict(), rng=rng_states(), args=vars(args))
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: a crash while saving leaves the previous checkpoint intact


def load_checkpoint(path: Path, model, optimizer, gala_state, device) -> int:
    """Restore everything from ``path``; returns the step to continue from."""
    blob = torch.load(path, map_location=device, weights_only=False)
    try:  # first the GALA state: its size check gives the clearest message for a wrong checkpoint
        gala_state.load_state_dict(blob["gala_state"])
    except ValueError as exc:
        raise ValueError(f"checkpoint {path} does not fit this run: {exc}") from None
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    set_rng_states(blob["rng"])
    return int(blob["step"])


# ----------------------------------------------------------------------------- training
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    data = p.add_argument_group("data")
    data.add_argument("--data-root", help="folder holding cifar-100-python/ (CIFAR-100-LT)")
    data.add_argument("--features", help="frozen features: .pt, .npz or .npy")
    data.add_argument("--labels", help="labels .npy for a .npy features file")
    data.add_argument("--imbalance", type=float, default=100.0, help="imbalance factor n_max / n_min")
    data.add_argument("--num-classes", type=int, default=100, help="synthetic data: classes")
    data.add_argument("--dim", type=int, default=64, help="synthetic data: feature dimension")
    data.add_argument("--samples-max", type=int, default=500, help="synthetic: samples of the head class")
    loss = p.add_argument_group("loss")
    loss.add_argument("--loss", choices=("gala", "fused-linear"), default="gala")
    loss.add_argument("--lambda1", type=float, default=1.2)
    loss.add_argument("--lambda2", type=float, default=0.9)
    loss.add_argument("--accumulation", choices=("cumulative", "sum", "ema"), default="cumulative")
    loss.add_argument("--backend", default="auto")
    loss.add_argument("--chunk-size", type=int, default=None, help="fused-linear: rows per chunk")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    opt.add_argument("--batch-size", type=int, default=64, help="per rank")
    opt.add_argument("--lr", type=float, default=0.05)
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=5e-4)
    opt.add_argument("--warmup-steps", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--checkpoint-dir", help="where checkpoint.pt is written")
    run.add_argument("--checkpoint-every", type=int, default=500)
    run.add_argument("--resume", help="a checkpoint file, or 'auto' for CHECKPOINT_DIR/checkpoint.pt")
    run.add_argument("--stop-after", type=int, help="leave after this step without saving (as if killed)")
    run.add_argument("--log-every", type=int, default=100)
    return p.parse_args(argv)


def learning_rate(args, step: int) -> float:
    """Linear warm-up, then cosine decay to 0 at ``--steps``: a pure function of the step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_data(args) -> Dataset:
    if args.data_root:
        return load_cifar100_lt(args.data_root, args.imbalance, args.seed)
    if args.features:
        return load_features(args.features, args.labels)
    return synthetic_long_tailed(args.num_classes, args.dim, args.samples_max, args.imbalance, args.seed)


def build_model(args, data: Dataset) -> nn.Module:
    torch.manual_seed(args.seed)
    if args.data_root:
        backbone, feature_dim = resnet32_backbone()
    else:
        backbone, feature_dim = nn.Identity(), data.x.shape[1]
    return Classifier(backbone, feature_dim, data.num_classes)


@torch.no_grad()
def evaluate(model: Classifier, test: Dataset, train_counts, device, batch_size=1000):
    """Top-1 accuracy overall and per shot group (many > 100, medium 20..100, few < 20 samples)."""
    model.eval()
    correct = torch.zeros(test.num_classes)
    total = torch.zeros(test.num_classes)
    for start in range(0, len(test.y), batch_size):
        x, y = test.x[start: start + batch_size].to(device), test.y[start: start + batch_size]
        hit = (model(x).argmax(1).cpu() == y).float()
        correct.index_add_(0, y, hit)
        total.index_add_(0, y, torch.ones_like(hit))
    model.train()
    per_class = correct / total.clamp(min=1)
    groups = {"many": train_counts > 100, "medium": (train_counts >= 20) & (train_counts <= 100),
              "few": train_counts < 20}
    out = {"overall": float(correct.sum() / total.sum().clamp(min=1))}
    out.update({k: float(per_class[m & (total > 0)].mean()) if bool((m & (total > 0)).any()) else float("nan")
                for k, m in groups.items()})
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    data = load_data(args)
    model = build_model(args, data).to(device)
    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    criterion = gk.GALALoss(data.num_classes, lambda1=args.lambda1, lambda2=args.lambda2,
                            accumulation=args.accumulation, backend=args.backend).to(device)
    gala_state = criterion.state  # the fused-linear path uses the same state object
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)

    checkpoint = Path(args.checkpoint_dir) / CHECKPOINT_NAME if args.checkpoint_dir else None
    step = 0
    if args.resume:
        path = checkpoint if args.resume == "auto" else Path(args.resume)
        if path is None:
            raise ValueError("--resume auto needs --checkpoint-dir")
        if path.is_file():
            step = load_checkpoint(path, model, optimizer, gala_state, device)
            if rank == 0:
                print(f"resumed from {path} at step {step}", flush=True)
        elif args.resume != "auto":
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    if checkpoint is not None and rank == 0:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)

    train_counts = data.class_counts()
    loss = None
    while step < args.steps:
        rows = batch_indices(step, len(data.y), args.batch_size, rank, world, args.seed)
        x, y = data.x[rows], data.y[rows]
        if data.augment:
            x = augment(x, step, rank, args.seed)
        x, y = x.to(device), y.to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        if args.loss == "gala":
            loss = criterion(train_model(x), y)
        else:
            features = train_model(x, features_only=True)
            loss = fused_linear_gala_ce(
                features, model.head.weight, y, gala_state, model.head.bias, lambda1=args.lambda1,
                lambda2=args.lambda2, backend=args.backend, chunk_size=args.chunk_size,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step}/{args.steps} loss {loss.item():.4f} lr {learning_rate(args, step - 1):.4g}",
                  flush=True)
        if checkpoint is not None and (step % args.checkpoint_every == 0 or step == args.steps):
            if rank == 0:
                save_checkpoint(checkpoint, step, model, optimizer, gala_state, args)
            if world > 1:
                dist.barrier()
        if args.stop_after is not None and step >= args.stop_after:
            break

    result = {"step": step, "loss": float(loss.detach()) if loss is not None else float("nan")}
    if data.test is not None and step == args.steps:
        result["accuracy"] = evaluate(model, data.test, train_counts, device)
        if rank == 0:
            summary = ", ".join(f"{k} {v:.3f}" for k, v in result["accuracy"].items())
            print(f"test accuracy {summary}", flush=True)
    if world > 1:
        del train_model  # the DDP reducer holds the process group: free it first (it sits in cycles)
        gc.collect()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
