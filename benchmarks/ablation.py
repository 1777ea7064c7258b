"""Ablation of fast-training techniques on Fashion-MNIST: one arm, one seed per invocation, one JSON line out.

Measures the validation split only (10,000 training images held out by a fixed permutation; never the test set)
after a fixed number of epochs, with several test-time views (plain, mirrored, mirrored + 1-pixel shifts).
Self-contained (NumPy + PyTorch, its own copies of the techniques) so that an arm is a flag, not a branch in the
library; what paid was then built into fmnist.fit (docs/results.md, "Sample efficiency").

    python benchmarks/ablation.py --epochs 3 --seed 0 --tag base                     # s2d-32, the old stem
    python benchmarks/ablation.py --epochs 3 --seed 0 --tag whiten --model w4        # whitening stem (s2dw-32)
    python benchmarks/ablation.py --epochs 3 --seed 0 --tag air --model air --bn_scale 0   # air-32
    python benchmarks/ablation.py --summarize benchmarks/results/ablation-zen3.jsonl

Arms: --lookahead (airbench's averaged weights copied back every 5 steps), --bn_scale 0 --bias_lr K (BatchNorm
without learned scale, biases at K x the learning rate), --dirac (partial-identity init), --ls (label smoothing),
--bs, --model s2d|w2|w4|air|airw, --widths. One thread by default (--threads): several arms can be compared on
a busy machine; the images/s it prints are that thread's.
"""
import argparse
import gzip
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

D = "/usr/share/datasets/fashion-mnist/"  # Debian's dataset-fashion-mnist


def idx(name):
    with gzip.open(D + name + ".gz") as f:
        b = f.read()
    nd = b[3]
    dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)


MEAN, STD = 0.2860, 0.3530


def load(seed, val=10000):
    x = idx("train-images-idx3-ubyte")
    y = idx("train-labels-idx1-ubyte").astype(np.int64)
    rng = np.random.default_rng(1234)  # fixed split across seeds
    p = rng.permutation(len(y))
    tr, va = p[val:], p[:val]
    def f(a):
        return torch.from_numpy(((a.astype(np.float32) / 255 - MEAN) / STD)[:, None])

    return f(x[tr]), torch.from_numpy(y[tr]), f(x[va]), torch.from_numpy(y[va])


BG = (0 - MEAN) / STD


def conv_bn(ci, co, bn_scale=True, act="relu"):
    bn = nn.BatchNorm2d(co)
    if not bn_scale:
        bn.weight.requires_grad_(False)
    a = nn.ReLU(inplace=True) if act == "relu" else nn.GELU()
    return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1, bias=False), bn, a)


class Pool(nn.Module):
    def forward(self, x):
        return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], 1)


class Whiten(nn.Module):
    """Frozen patch-whitening conv (k x k, stride s): eigenvectors of the patch covariance, +/-."""

    def __init__(self, k, stride, pad, eps=5e-3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2 * k * k, k, stride=stride, padding=pad, bias=True)
        self.conv.weight.requires_grad_(False)
        self.conv.bias.requires_grad_(False)
        self.k, self.eps = k, eps

    @torch.no_grad()
    def fit(self, x):
        k = self.k
        p = F.unfold(x, k).transpose(1, 2).reshape(-1, k * k).double()
        mean = p.mean(0)
        c = torch.cov(p.T)
        ev, V = torch.linalg.eigh(c)
        W = (V / torch.sqrt(ev + self.eps)).T  # rows: whitening filters
        W = torch.cat([W, -W]).float().reshape(2 * k * k, 1, k, k)
        self.conv.weight.copy_(W)
        self.conv.bias.copy_(-(W.reshape(2 * k * k, -1) @ mean.float()))

    def forward(self, x):
        return self.conv(x)


class Net(nn.Module):
    def __init__(self, body, dim, scale=1.0):
        super().__init__()
        self.body, self.head, self.scale = body, nn.Linear(dim, 10, bias=scale == 1.0), scale

    def forward(self, x):
        return self.head(self.body(x)) * self.scale


def s2d(widths=(32, 64, 128), stem="s2d", bn_scale=True):
    a, b, c = widths
    if stem == "s2d":
        st, c0 = nn.PixelUnshuffle(2), 4
    elif stem == "w2":
        st, c0 = Whiten(2, 2, 0), 8
    elif stem == "w4":
        st, c0 = Whiten(4, 2, 1), 32
    body = nn.Sequential(st, conv_bn(c0, a, bn_scale), conv_bn(a, a, bn_scale), nn.MaxPool2d(2),
                         conv_bn(a, b, bn_scale), conv_bn(b, b, bn_scale), nn.MaxPool2d(2),
                         conv_bn(b, c, bn_scale), Pool())
    return body, 2 * c


class AirBlock(nn.Module):
    def __init__(self, ci, co, bn_scale=False):
        super().__init__()
        self.c1 = nn.Conv2d(ci, co, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(co)
        self.c2 = nn.Conv2d(co, co, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(co)
        for bn in (self.b1, self.b2):
            if not bn_scale:
                bn.weight.requires_grad_(False)

    def forward(self, x):
        x = F.max_pool2d(self.c1(x), 2, ceil_mode=False)
        x = F.gelu(self.b1(x))
        return F.gelu(self.b2(self.c2(x)))


def air(widths=(32, 64, 128), bn_scale=False):
    """airbench-shaped: whitening stem at full res, 3 blocks (conv, pool, BN, GELU, conv, BN, GELU), global max."""
    a, b, c = widths
    body = nn.Sequential(Whiten(3, 1, 1), nn.GELU(), AirBlock(18, a, bn_scale), AirBlock(a, b, bn_scale),
                         AirBlock(b, c, bn_scale), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return body, c


def airw(widths=(64, 128), bn_scale=False):
    a, b = widths[:2]
    body = nn.Sequential(Whiten(4, 2, 1), nn.GELU(), AirBlock(32, a, bn_scale), AirBlock(a, b, bn_scale),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return body, b


def make(args):
    w = tuple(int(v) for v in args.widths.split(","))
    if args.model == "airw":
        body, dim = airw(w, args.bn_scale)
        return Net(body, dim, args.head_scale)
    if args.model == "air":
        body, dim = air(w, args.bn_scale)
    else:
        body, dim = s2d(w, args.model, args.bn_scale)
    return Net(body, dim, args.head_scale)


def dirac_init(model):
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.requires_grad and m.in_channels > 4:
            w = m.weight
            n = min(w.shape[0], w.shape[1])
            torch.nn.init.dirac_(w.data[:n])


def augment(x, g, flip, crop, pad=2, alt_flip_epoch=None):
    n = len(x)
    if crop:
        xp = F.pad(x, (pad,) * 4, value=BG)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        r = (dy[:, None] + torch.arange(28))[:, None, :, None]
        c = (dx[:, None] + torch.arange(28))[:, None, None, :]
        x = xp[torch.arange(n)[:, None, None, None], 0:1, r, c]
    if flip:
        m = torch.rand(n, generator=g) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def shift(x, dy, dx):
    xp = F.pad(x, (1, 1, 1, 1), value=BG)
    return xp[:, :, 1 + dy:29 + dy, 1 + dx:29 + dx]


@torch.no_grad()
def evaluate(model, x, y, bs=1000):
    model.eval()
    outs = {k: [] for k in ("plain", "flip", "flip_x1", "flip_xy1")}
    for i in range(0, len(x), bs):
        xb = x[i:i + bs].contiguous(memory_format=torch.channels_last)
        l0 = model(xb).float()
        lf = model(xb.flip(3)).float()
        base = 0.5 * (l0 + lf)
        outs["plain"].append(l0)
        outs["flip"].append(base)
        sx = [model(shift(v, 0, d).contiguous(memory_format=torch.channels_last)).float()
              for v in (xb, xb.flip(3)) for d in (-1, 1)]
        outs["flip_x1"].append(0.5 * base + 0.125 * sum(sx))
        sxy = [model(shift(v, d, d).contiguous(memory_format=torch.channels_last)).float()
               for v in (xb, xb.flip(3)) for d in (-1, 1)]
        outs["flip_xy1"].append(0.5 * base + 0.125 * sum(sxy))
    res = {}
    for k, v in outs.items():
        lg = torch.cat(v)
        res[k] = float((lg.argmax(1) == y).double().mean())
        if k == "flip":
            res["val_loss"] = float(F.cross_entropy(lg, y))
    return res


def summarize(path):
    """Mean +- std of each arm's mirrored-view validation accuracy, by (tag, epochs)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    groups = {}
    for r in rows:
        groups.setdefault((r["tag"], r["epochs"], r["model"], r["widths"]), []).append(r)
    print("| arm | model | epochs | seeds | val. acc. % (mirrored views) | + 1-px shifts | img/s (1 thread) |")
    print("|---|---|---|---|---|---|---|")
    for (tag, epochs, model, widths), rs in groups.items():
        f = np.array([r["flip"] for r in rs]) * 100
        x = np.array([r["flip_x1"] for r in rs]) * 100
        print(f"| {tag} | {model} {widths} | {epochs:g} | {len(rs)} | {f.mean():.2f} +- {f.std():.2f} | "
              f"{x.mean():.2f} | {np.mean([r['img_s'] for r in rs]):.0f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--summarize", default=None, help="print the table of a results file and exit")
    p.add_argument("--model", default="s2d")
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--bs", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--ls", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flip", type=int, default=1)
    p.add_argument("--crop", type=int, default=0)
    p.add_argument("--lookahead", type=int, default=0)
    p.add_argument("--ema", type=float, default=0.0)
    p.add_argument("--bn_scale", type=int, default=1)
    p.add_argument("--bias_lr", type=float, default=1.0)
    p.add_argument("--bn_mom", type=float, default=0.1)
    p.add_argument("--dirac", type=int, default=0)
    p.add_argument("--head_scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    xt, yt, xv, yv = load(args.seed)
    model = make(args)
    for m in model.modules():
        if isinstance(m, Whiten):
            m.fit(xt[:5000])
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = args.bn_mom
    if args.dirac:
        dirac_init(model)
    model = model.to(memory_format=torch.channels_last)
    params = [q for q in model.parameters() if q.requires_grad]
    decay = [q for q in params if q.ndim > 1]
    bias = [q for q in params if q.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.wd, "lr_scale": 1.0},
              {"params": bias, "weight_decay": args.wd / args.bias_lr if args.bias_lr != 1 else 0.0,
               "lr_scale": args.bias_lr}]
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(args.seed + 1)
    n = len(yt)
    per_epoch = n // args.bs
    total = int(round(args.epochs * per_epoch))
    slow = None
    if args.lookahead or args.ema:
        slow = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step, t0 = 0, time.perf_counter()
    model.train()
    while step < total:
        perm = torch.randperm(n, generator=g)
        for b in range(per_epoch):
            if step >= total:
                break
            idx_ = perm[b * args.bs:(b + 1) * args.bs]
            xb = augment(xt[idx_], g, args.flip, args.crop).contiguous(memory_format=torch.channels_last)
            prog = (step + 1) / total
            lr = args.lr * (prog / args.warmup if prog < args.warmup else (1 - prog) / (1 - args.warmup))
            for gr in opt.param_groups:
                gr["lr"] = lr * gr["lr_scale"]
            loss = F.cross_entropy(model(xb), yt[idx_], label_smoothing=args.ls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if args.lookahead and step % 5 == 0:
                decay_ = 0.95 ** 5 * (step / total) ** 3
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.is_floating_point():
                            slow[k].lerp_(v, 1 - decay_)
                            v.copy_(slow[k])
                        else:
                            slow[k].copy_(v)
            elif args.ema:
                d = min(args.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.is_floating_point():
                            slow[k].lerp_(v, 1 - d)
                        else:
                            slow[k].copy_(v)
    train_s = time.perf_counter() - t0
    if args.ema and not args.lookahead:
        model.load_state_dict(slow)
    res = evaluate(model, xv, yv)
    out = {"tag": args.tag, **{k: getattr(args, k) for k in ("model", "widths", "epochs", "bs", "lr", "ls", "seed",
                                                              "lookahead", "ema", "bn_scale", "bias_lr", "dirac",
                                                              "crop", "head_scale", "bn_mom", "wd")},
           **res, "train_s": round(train_s, 1), "img_s": round(total * args.bs / train_s),
           "params": sum(q.numel() for q in model.parameters())}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
