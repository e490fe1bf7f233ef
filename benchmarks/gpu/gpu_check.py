"""One-shot GPU check: MfNS_De and the AE U-Net against stock nnU-Net, measured in the same run.

Runs on a lent GPU machine with nothing but torch, numpy and the bundle's wheels
(``dynamic_network_architectures``, stock nnU-Net's networks); ``benchmarks/gpu/prepare.py`` made
everything else on the CPU machine (plans, trainer settings, preprocessed phantom slices). Of this
project it imports only ``nnunet_pvs.networks.*``, which need torch alone (checked at start).

Sections, each with its own share of the time budget (what did not fit is listed as skipped):

a. **train step**: forward + deep-supervision loss + backward + optimiser step, each network with its
   trainer's own loss and optimiser, on one fixed batch of phantom patches (2d: stock PlainConvUNet,
   MfNS_De default and ``_lite``, batch 4 at the plan's patch; the same at nnU-Net's plan for the
   papers' 320 x 320 slices, random data, where the README's memory figures are stated; 3d: stock
   3d_fullres vs AE U-Net at a 64^3 plan, each trainer's batch, random data). Float32, autocast float16 with a GradScaler (what nnU-Net does on
   a GPU) and autocast bfloat16; eager, and under ``torch.compile`` (nnU-Net's default on a GPU).
   CUDA-synchronised wall time, median of the timed steps after warm-up; ``max_memory_allocated`` of
   a step, cross-checked by the bytes autograd saves for backward (``saved_tensors_hooks``).
b. **prediction** of the whole held-out slice stack (full slices, batched, deep supervision off,
   no mirroring), autocast float16 as nnU-Net's predictor, eager and compiled.
c. **short training** of MfNS_De and stock 2d, alternating steps so both get the same number: patches
   sampled as nnU-Net's 2d loader does (random case; the last third of each batch centred on a
   foreground voxel), random flips only, each trainer's batch size, loss, optimiser and schedule,
   autocast float16; held-out Dice at four points.

Losses are re-implemented here in a few lines (nnU-Net is not on the machine); ``tests/test_gpu_check.py``
checks them against nnU-Net's own on the CPU.

    python benchmarks/gpu/gpu_check.py --bundle benchmarks/gpu/bundle --out DIR [--dry-run]

``--dry-run`` runs every section on the CPU at tiny scale (compile with the ``eager`` backend).
Writes ``DIR/check_gpu.md`` and ``.json`` (``check_dryrun.*`` for a dry run), rewritten after every
section so a run cut short still leaves its figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import pydoc
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MIB = 1024 ** 2
PRECISIONS = ("fp32", "fp16", "bf16")
SECTIONS = ("train_step", "train_step_320", "train_step_3d", "predict", "training", "compile")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: modules that must not come in with ``nnunet_pvs.networks`` (they are not on the GPU machine)
_FORBIDDEN = ("nnunetv2", "batchgeneratorsv2", "batchgenerators", "SimpleITK", "nibabel", "blosc2", "acvl_utils")


class CheckError(Exception):
    """A problem with the bundle or the environment: one line, non-zero exit."""


# --------------------------------------------------------------------------------------------------
# time budget and report


class Budget:
    """Deadlines of consecutive sections: section ``i`` may run until the sum of the allowances of
    sections ``0..i`` (scaled to the total) has passed, so time a section leaves goes to the next."""

    def __init__(self, total_s: float, allowances: dict[str, float]):
        self.t0, self.total = time.perf_counter(), float(total_s)
        scale = self.total / sum(allowances.values())
        self.ends, acc = {}, 0.0
        for name, share in allowances.items():
            acc += share * scale
            self.ends[name] = acc

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self, section: str) -> float:
        return min(self.ends[section], self.total) - self.elapsed()


class Report:
    """Markdown + JSON report, rewritten in full after every section (a run cut short keeps its figures)."""

    def __init__(self, md_path: Path, title: str):
        self.md_path, self.title = md_path, title
        self.settings: list[str] = []
        self.tables: list[dict] = []
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self.data: dict = {"settings": {}, "rows": {}, "skipped": self.skipped}

    def table(self, key: str, title: str, columns: list[str], intro: str = "") -> dict:
        t = {"key": key, "title": title, "columns": columns, "rows": [], "intro": intro}
        self.tables.append(t)
        self.data["rows"][key] = t["rows"]
        return t

    def skip(self, what: str) -> None:
        print(f"  skipped: {what}", flush=True)
        self.skipped.append(what)

    def write(self, status: str) -> None:
        lines = [f"# {self.title}", "", f"Status: {status}.", "", "## Settings", ""]
        lines += [f"- {s}" for s in self.settings]
        for t in self.tables:
            lines += ["", f"## {t['title']}", ""]
            if t["intro"]:
                lines += [t["intro"], ""]
            if not t["rows"]:
                lines += ["(no rows: see Skipped)"]
                continue
            lines += ["| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in t["columns"]) + " |" for r in t["rows"]]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        lines += ["", "## Skipped", ""] + ([f"- {s}" for s in self.skipped] or ["- nothing"])
        tmp = self.md_path.with_suffix(".md.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.md_path)
        js = self.md_path.with_suffix(".json")
        tmp = js.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**self.data, "status": status}, indent=1, default=str))
        tmp.replace(js)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v).replace("|", "/")


# --------------------------------------------------------------------------------------------------
# networks, losses, optimisers (torch only)


def import_networks():
    """``nnunet_pvs.networks.mfns_de`` and ``.ae_unet`` from this checkout; refuses if importing them
    pulls in nnU-Net or its dependencies (a package ``__init__`` that grew imports)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    before = set(sys.modules)
    from nnunet_pvs.networks import ae_unet, mfns_de

    pulled = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in _FORBIDDEN)
    if pulled:
        raise CheckError(f"importing nnunet_pvs.networks pulled in {', '.join(pulled[:3])}: the GPU machine has none "
                         f"of these; keep nnunet_pvs/__init__.py and nnunet_pvs/networks/ torch-only")
    return mfns_de, ae_unet


def _locate(name: str):
    obj = pydoc.locate(name)
    if obj is None:
        raise CheckError(f"cannot import {name} (is the bundle's dynamic_network_architectures wheel installed?)")
    return obj


def build_stock(cfg: dict, deep_supervision: bool = True) -> torch.nn.Module:
    """Stock nnU-Net's network from a plan, as ``get_network_from_plans`` builds it (He init)."""
    kwargs = dict(cfg["arch"]["kwargs"])
    for key in cfg["arch"]["req_import"]:
        if isinstance(kwargs.get(key), str):
            kwargs[key] = _locate(kwargs[key])
    net = _locate(cfg["arch"]["class"])(input_channels=cfg["num_input_channels"], num_classes=cfg["num_classes"],
                                        deep_supervision=deep_supervision, **kwargs)
    if hasattr(net, "initialize"):
        net.apply(net.initialize)
    return net


def build_mfns(mfns_de, cfg: dict, variant: str) -> torch.nn.Module:
    v = cfg["mfns_de"]["variants"][variant]
    return mfns_de.mfns_de_from_plans(cfg["arch"]["kwargs"], cfg["arch"]["req_import"], cfg["num_input_channels"],
                                      cfg["num_classes"], True, features_per_stage=v["features_per_stage"],
                                      n_levels=v["n_levels"], blocks_per_level=v["blocks_per_level"],
                                      fusion_blocks=v["fusion_blocks"])


def build_ae(ae_unet, cfg3: dict) -> torch.nn.Module:
    a = cfg3["ae_unet"]
    return ae_unet.AEUNet(cfg3["num_input_channels"], a["pool_strides"], a["kernel_sizes"], a["n_kernels_init"],
                          a["n_convs"], a["dropout"], True, cfg3["num_classes"])


def set_deep_supervision(net: torch.nn.Module, on: bool) -> None:
    """nnU-Net's switch (``decoder.deep_supervision``), on the module under a torch.compile wrapper too."""
    net = getattr(net, "_orig_mod", net)
    if hasattr(net, "decoder") and hasattr(net.decoder, "deep_supervision"):
        net.decoder.deep_supervision = on


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool, do_bg: bool = False,
                   smooth: float = 1e-5) -> torch.Tensor:
    """Negative soft Dice of ``softmax(logits)`` against the label map ``target`` (B, 1, ...), summed in
    float32 (nnU-Net's ``MemoryEfficientSoftDiceLoss``: one Dice per class, averaged)."""
    probs = torch.softmax(logits, 1)
    with torch.no_grad():
        onehot = torch.zeros(probs.shape, device=probs.device, dtype=torch.float32)
        onehot.scatter_(1, target.long(), 1)
        if not do_bg:
            onehot = onehot[:, 1:]
    if not do_bg:
        probs = probs[:, 1:]
    axes = tuple(range(2, probs.ndim))
    intersect = (probs * onehot).sum(axes, dtype=torch.float32)
    sum_pred = probs.sum(axes, dtype=torch.float32)
    sum_gt = onehot.sum(axes, dtype=torch.float32)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dice = (2 * intersect + smooth) / (sum_gt + sum_pred + smooth).clamp_min(1e-8)
    return -dice.mean()


def make_loss(rec: dict):
    """The trainer's loss from its record: weighted Dice + cross-entropy per output, and the
    deep-supervision sum over outputs (weights 0 skipped, as nnU-Net's wrapper does)."""
    w_ce, w_dice = rec["weight_ce"], rec["weight_dice"]
    batch_dice, do_bg, smooth = rec["batch_dice"], rec["do_bg"], rec["smooth"]

    def single(logits, target):
        value = 0.0
        if w_dice:
            value = value + w_dice * soft_dice_loss(logits, target, batch_dice, do_bg, smooth)
        if w_ce:
            value = value + w_ce * F.cross_entropy(logits, target[:, 0].long())
        return value

    weights = rec.get("ds_weights")
    if not weights:
        return single

    def deep_supervised(outputs, targets):
        return sum(w * single(o, t) for w, o, t in zip(weights, outputs, targets) if w != 0)

    return deep_supervised


def ds_targets(seg: torch.Tensor, scales: list | None, mode: str) -> list[torch.Tensor] | torch.Tensor:
    """Targets per deep-supervision scale from a (B, 1, ...) label map: nnU-Net's nearest-exact
    resampling (stock) or max-pooling (MfNS_De's foreground-highlighting targets, binary labels)."""
    if not scales:
        return seg
    out = []
    pool = {2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[seg.ndim - 2]
    for s in scales:
        shape = [max(1, round(n * f)) for n, f in zip(seg.shape[2:], s)]
        if shape == list(seg.shape[2:]):
            out.append(seg)
        elif mode.startswith("max"):
            out.append(pool(seg.float(), shape).to(seg.dtype))
        else:
            out.append(F.interpolate(seg.float(), shape, mode="nearest-exact").to(seg.dtype))
    return out


def make_optimizer(params, rec: dict) -> torch.optim.Optimizer:
    kind = rec["type"]
    if kind == "SGD":
        return torch.optim.SGD(params, lr=rec["lr"], momentum=rec["momentum"], nesterov=rec["nesterov"],
                               weight_decay=rec["weight_decay"])
    if kind == "Adagrad":
        return torch.optim.Adagrad(params, lr=rec["lr"], weight_decay=rec["weight_decay"])
    if kind == "Adam":
        return torch.optim.Adam(params, lr=rec["lr"], betas=tuple(rec.get("betas", (0.9, 0.999))),
                                weight_decay=rec["weight_decay"])
    raise CheckError(f"optimiser {kind} in the bundle is not supported by gpu_check.py")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


class Trainee:
    """A network with its trainer's loss, optimiser and nnU-Net's train step (autocast, GradScaler for
    float16, gradient norm clipped at 12)."""

    def __init__(self, net, trainer_rec: dict, precision: str, device: torch.device, compile_backend: str | None = None):
        self.net = net
        self.model = torch.compile(net, backend=compile_backend) if compile_backend else net
        self.loss = make_loss(trainer_rec["loss"])
        self.opt = make_optimizer(net.parameters(), trainer_rec["optimizer"])
        self.clip = trainer_rec.get("grad_clip", 12.0)
        self.precision, self.device = precision, device
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def forward_loss(self, x, targets):
        with autocast(self.device, self.precision):
            return self.loss(self.model(x), targets)

    def step(self, x, targets) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_loss(x, targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
            self.opt.step()
        return loss.detach()


def saved_bytes(trainee: Trainee, x, targets) -> int:
    """Bytes autograd saves for backward in forward + loss, each storage counted once."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        except Exception:  # noqa: BLE001  tensors without a storage (sparse, nested) are not counted
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainee.forward_loss(x, targets)
    del loss
    return int(sum(seen.values()))


def reset_compiled() -> None:
    """Forget earlier compiled graphs, so each configuration compiles afresh (and no cache limit is hit)."""
    import torch._dynamo

    torch._dynamo.reset()


def n_params(net) -> float:
    return sum(p.numel() for p in net.parameters()) / 1e6


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# data: sampling as nnU-Net's 2d loader, on the device


class SliceData:
    """A stack of 2d slices (padded to a common size) with each case's true in-plane shape."""

    def __init__(self, arrays: dict, prefix: str, device: torch.device):
        self.images = torch.from_numpy(arrays[f"{prefix}_images"]).to(device)  # (N, H, W) float16
        self.labels = torch.from_numpy(arrays[f"{prefix}_labels"]).to(device)  # (N, H, W) uint8
        self.case = arrays[f"{prefix}_case"].astype(np.int64)
        self.shape = arrays[f"{prefix}_shape"].astype(np.int64)
        self.n_cases = len(self.shape)
        self.slices_of = [np.flatnonzero(self.case == c) for c in range(self.n_cases)]
        labels = arrays[f"{prefix}_labels"]
        self.foreground = []  # per case: (k, 3) global slice index, y, x of foreground pixels
        for c in range(self.n_cases):
            z, y, x = np.nonzero(labels[self.slices_of[c]])
            self.foreground.append(np.stack([self.slices_of[c][z], y, x], 1) if len(z) else np.zeros((0, 3), np.int64))


class PatchSampler:
    """Random patches as nnU-Net's 2d data loader draws them: a random case for every sample; samples
    at the end of the batch (``round(B * (1 - oversample)) .. B-1``) are centred on a random foreground
    pixel of that case, the others on a random slice at a random position (shape plus the padding
    needed to reach the patch); then a random flip per axis (nnU-Net's mirroring; no other
    augmentation)."""

    def __init__(self, data: SliceData, patch: list[int], oversample: float, seed: int, flips: bool = True):
        self.d, self.patch, self.oversample, self.flips = data, [int(p) for p in patch], oversample, flips
        self.rng = np.random.default_rng(seed)
        ph, pw = self.patch
        n, h, w = data.images.shape
        dev = data.images.device
        self.pad = (ph, pw)
        self.images = torch.zeros((n, h + 2 * ph, w + 2 * pw), dtype=data.images.dtype, device=dev)
        self.images[:, ph:ph + h, pw:pw + w] = data.images
        self.labels = torch.zeros((n, h + 2 * ph, w + 2 * pw), dtype=data.labels.dtype, device=dev)
        self.labels[:, ph:ph + h, pw:pw + w] = data.labels
        self.ar = [torch.arange(p, device=dev) for p in self.patch]

    def corners(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(slice index, top-left corner) per sample, corners in unpadded coordinates."""
        zs, corners = np.zeros(batch, np.int64), np.zeros((batch, 2), np.int64)
        for i in range(batch):
            c = int(self.rng.integers(self.d.n_cases))
            shape = self.d.shape[c]
            need = np.maximum(np.array(self.patch) - shape, 0)
            lbs = -(need // 2)
            ubs = shape + need // 2 + need % 2 - np.array(self.patch)
            force_fg = not i < round(batch * (1 - self.oversample))
            fg = self.d.foreground[c]
            if force_fg and len(fg):
                z, y, x = fg[int(self.rng.integers(len(fg)))]
                zs[i] = z
                corners[i] = np.maximum(lbs, np.array([y, x]) - np.array(self.patch) // 2)
            else:
                zs[i] = self.d.slices_of[c][int(self.rng.integers(len(self.d.slices_of[c])))]
                corners[i] = [int(self.rng.integers(lbs[k], ubs[k] + 1)) for k in range(2)]
        return zs, corners

    def batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        zs, corners = self.corners(batch)
        dev = self.images.device
        z = torch.from_numpy(zs).to(dev)
        cy = torch.from_numpy(corners[:, 0] + self.pad[0]).to(dev)
        cx = torch.from_numpy(corners[:, 1] + self.pad[1]).to(dev)
        iy = (cy[:, None] + self.ar[0])[:, :, None]
        ix = (cx[:, None] + self.ar[1])[:, None, :]
        x = self.images[z[:, None, None], iy, ix].float()
        y = self.labels[z[:, None, None], iy, ix]
        if self.flips:
            for axis in (1, 2):
                f = torch.from_numpy(self.rng.random(batch) < 0.5).to(dev)[:, None, None]
                x = torch.where(f, x.flip(axis), x)
                y = torch.where(f, y.flip(axis), y)
        return x[:, None].contiguous(), y[:, None].contiguous()


def padded_stack(data: SliceData, divisor: list[int], patch: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Every held-out slice zero-padded to the plan's patch (or to the next multiple of the network's
    total stride where a slice is larger): (N, 1, H, W) float32."""
    n, h, w = data.images.shape
    size = [max(int(p), int(math.ceil(s / d) * d)) for p, s, d in zip(patch, (h, w), divisor)]
    out = torch.zeros((n, 1, *size), dtype=torch.float32, device=data.images.device)
    out[:, 0, :h, :w] = data.images.float()
    return out, size


def predict_stack(model, stack: torch.Tensor, batch: int, precision: str, device) -> torch.Tensor:
    """Class index per pixel of every slice in ``stack`` (inference mode, autocast, batches of ``batch``)."""
    preds = []
    with torch.inference_mode(), autocast(device, precision):
        for i in range(0, stack.shape[0], batch):
            preds.append(model(stack[i:i + batch]).argmax(1).to(torch.uint8))
    return torch.cat(preds)


def held_out_dice(pred: torch.Tensor, data: SliceData) -> tuple[float, float]:
    """(mean per-case Dice, pooled Dice) of foreground, each case's slices stacked, padding excluded."""
    n, h, w = data.labels.shape
    pred = pred[:, :h, :w]
    per_case, tp_all, sum_all = [], 0, 0
    for c in range(data.n_cases):
        idx = torch.from_numpy(data.slices_of[c]).to(pred.device)
        y, x = (int(v) for v in data.shape[c])
        p = pred[idx, :y, :x] > 0
        g = data.labels[idx, :y, :x] > 0
        tp, s = int((p & g).sum()), int(p.sum() + g.sum())
        per_case.append(1.0 if s == 0 else 2 * tp / s)
        tp_all, sum_all = tp_all + tp, sum_all + s
    return float(np.mean(per_case)), (1.0 if sum_all == 0 else 2 * tp_all / sum_all)


def total_stride(arch_kwargs: dict) -> list[int]:
    return [int(v) for v in np.prod(np.array(arch_kwargs["strides"]), axis=0)]


# --------------------------------------------------------------------------------------------------
# the check


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        if args.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(args.device)
        if self.device.type != "cuda" and not self.dry:
            raise CheckError("no CUDA device visible to PyTorch: run on the GPU machine, or use --dry-run on a CPU")
        self.cuda = self.device.type == "cuda"
        bundle = Path(args.bundle)
        if not (bundle / "bundle.json").is_file():
            raise CheckError(f"{bundle}/bundle.json not found: run python benchmarks/gpu/prepare.py first")
        try:
            self.manifest = json.loads((bundle / "bundle.json").read_text())
            with np.load(bundle / self.manifest["data"]["file"]) as z:
                arrays = {k: z[k] for k in z.files}
            self.cfg2, self.cfg3 = self.manifest["2d"], self.manifest["3d"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckError(f"{bundle}: not a bundle made by prepare.py ({type(e).__name__}: {e})") from e
        self.mfns_de, self.ae_unet = import_networks()
        torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer
        self.train = SliceData(arrays, "train", self.device)
        self.val = SliceData(arrays, "val", self.device)
        name = "check_dryrun" if self.dry else "check_gpu"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.report = Report(out / f"{name}.md", "One-shot GPU check: MfNS_De and AE U-Net vs stock nnU-Net"
                             + (" (DRY RUN on the CPU, tiny scale: figures mean nothing)" if self.dry else ""))
        # seconds out of 480; time a section leaves goes to the next (compile is last: it gets the rest)
        self.budget = Budget(args.budget_s, {"train_step": 60, "train_step_320": 20, "train_step_3d": 25,
                                              "predict": 15, "training": 170, "compile": 190})
        self.step_ms: dict[tuple, float] = {}
        self.compile_s: list[float] = []

    # ---------------------------------------------------------------- helpers

    def models_2d(self, cfg: dict | None = None) -> list[tuple[str, str, callable]]:
        """(name, trainer key, builder) of the 2d models, stock first (the ratios' baseline)."""
        cfg = cfg or self.cfg2
        return [("stock 2d (PlainConvUNet)", "stock", lambda ds=True: build_stock(cfg, ds)),
                ("MfNS_De", "mfns_de", lambda ds=True: self._mfns("default", ds, cfg)),
                ("MfNS_De_lite", "mfns_de", lambda ds=True: self._mfns("lite", ds, cfg))]

    def _mfns(self, variant: str, ds: bool, cfg: dict | None = None):
        net = build_mfns(self.mfns_de, cfg or self.cfg2, variant)
        set_deep_supervision(net, ds)
        return net

    def models_3d(self):
        return [("stock 3d_fullres (PlainConvUNet)", "stock", lambda: build_stock(self.cfg3, True)),
                ("AE U-Net (8.7.2)", "ae_unet", lambda: build_ae(self.ae_unet, self.cfg3))]

    def _trainer_rec(self, cfg: dict, key: str) -> dict:
        rec = dict(cfg[key])
        rec["loss"] = dict(rec["loss"])
        return rec

    def _batch_2d(self, key: str, batch: int):
        """A batch of phantom patches, the same for every model (one sampler, re-seeded)."""
        if getattr(self, "_sampler", None) is None:
            self._sampler = PatchSampler(self.train, self.cfg2["patch_size"], self.cfg2["oversample_foreground"], 0)
        self._sampler.rng = np.random.default_rng(0)
        x, seg = self._sampler.batch(batch)
        return x, ds_targets(seg, self.cfg2[key]["ds_scales"], self.cfg2[key]["target_downsampling"])

    def _batch_random(self, cfg: dict, key: str, batch: int):
        """Random inputs and sparse labels at the plan's patch (plans without data)."""
        g = torch.Generator().manual_seed(0)
        patch = cfg["patch_size"]
        x = torch.randn((batch, 1, *patch), generator=g).to(self.device)
        seg = (torch.rand((batch, 1, *patch), generator=g) > 0.995).to(torch.uint8).to(self.device)
        rec = cfg[key]
        return x, ds_targets(seg, rec.get("ds_scales"), rec.get("target_downsampling", "nearest-exact"))

    def _batch_3d(self, key: str, batch: int):
        return self._batch_random(self.cfg3, key, batch)

    def _time_steps(self, trainee: Trainee, x, targets, deadline: float) -> dict:
        """First step (autotuning / compilation), warm-up, then timed steps until done or the deadline."""
        t = time.perf_counter()
        trainee.step(x, targets)
        sync(self.device)
        first = time.perf_counter() - t
        for _ in range(self.args.warmup):
            trainee.step(x, targets)
        sync(self.device)
        res = {"first_s": first}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(self.args.steps):
            t = time.perf_counter()
            trainee.step(x, targets)
            sync(self.device)
            times.append(time.perf_counter() - t)
            if time.perf_counter() > deadline and len(times) >= 3:
                break
        res.update(ms=1e3 * statistics.median(times), n=len(times))
        if self.cuda:
            res.update(peak_mib=torch.cuda.max_memory_allocated() / MIB,
                       step_mib=(torch.cuda.max_memory_allocated() - base) / MIB, resident_mib=base / MIB)
        return res

    def _deadline(self, section: str) -> float:
        return time.perf_counter() + self.budget.left(section)

    def _fail(self, what: str, e: BaseException) -> None:
        line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        self.report.skip(f"{what}: FAILED ({line})")
        traceback.print_exc()
        self.failures.append(what)

    # ---------------------------------------------------------------- sections

    def settings(self) -> None:
        m, r = self.manifest, self.report
        dev = torch.cuda.get_device_name(self.device) if self.cuda else f"CPU ({platform.processor() or platform.machine()})"
        import dynamic_network_architectures as dna

        r.settings += [
            f"device: **{dev}**" + (f", {torch.cuda.get_device_properties(self.device).total_memory / 1024 ** 3:.0f} GiB, "
                                   f"{torch.cuda.get_device_properties(self.device).multi_processor_count} SMs" if self.cuda else ""),
            f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
            f"Python {platform.python_version()}, numpy {np.__version__}; dynamic_network_architectures from "
            f"{Path(dna.__file__).parent} (the bundle's wheel, installed by run.sh)",
            f"cudnn.benchmark True (as nnU-Net); TF32: cudnn {torch.backends.cudnn.allow_tf32}, matmul "
            f"{torch.backends.cuda.matmul.allow_tf32} (PyTorch defaults; float32 convolutions may use TF32)",
            f"bundle: made {m['created']} with nnunetv2 {m['made_with']['nnunetv2']}, nnunet-pvs {m['made_with']['nnunet_pvs']}"
            + (" (TINY synthetic bundle)" if m.get("tiny") else ""),
            f"data: {m['data']['phantom']}; {m['data']['preprocessing']}; fold 0 ({m['data']['split_source']}): "
            f"{len(m['data']['train_cases'])} training cases ({m['data']['train_slices']} slices), "
            f"{len(m['data']['val_cases'])} held-out ({m['data']['val_slices']} slices)",
            f"2d plan ({self.cfg2['plans_name']}): patch {self.cfg2['patch_size']}, spacing {self.cfg2['spacing']}, "
            f"{self.cfg2['arch']['kwargs']['n_stages']} stages, features {self.cfg2['arch']['kwargs']['features_per_stage']}, "
            f"plan batch {self.cfg2['plan_batch_size']}, batch Dice {self.cfg2['batch_dice']}",
        ]
        for key, label in (("stock", "stock nnUNetTrainer 2d"), ("mfns_de", "nnUNetTrainerMfNSDe")):
            t = self.cfg2[key]
            r.settings.append(f"{label}: batch {t['batch_size']}, optimiser {_opt_text(t['optimizer'])}, loss "
                              f"{_loss_text(t['loss'])}, deep-supervision scales {t['ds_scales']} with weights "
                              f"{[round(w, 4) for w in t['loss'].get('ds_weights', [])]}, targets {t['target_downsampling']}, "
                              f"gradient norm clipped at {t['grad_clip']:g}")
        for k, v in self.cfg2["mfns_de"]["variants"].items():
            r.settings.append(f"MfNS_De {k} ({v['trainer']}): {v['n_levels']} levels, widths {v['features_per_stage']}, "
                              f"ResCBAM blocks per level {v['blocks_per_level']}, fusion {v['fusion_blocks']}")
        c3 = self.cfg3
        r.settings += [
            f"3d plan ({c3['plans_name']}, a {'x'.join(map(str, c3['patch_size']))} 1 mm volume): patch {c3['patch_size']}, "
            f"{c3['arch']['kwargs']['n_stages']} stages; stock 3d batch {c3['stock']['batch_size']}, "
            f"{_opt_text(c3['stock']['optimizer'])}, {_loss_text(c3['stock']['loss'])}; AE U-Net batch "
            f"{c3['ae_unet']['batch_size']}, pool strides {c3['ae_unet']['pool_strides']}, "
            f"{_opt_text(c3['ae_unet']['optimizer'])}, {_loss_text(c3['ae_unet']['loss'])}; 3d inputs are random",
            f"timing: CUDA-synchronised wall time per step, median of up to {self.args.steps} steps after "
            f"{self.args.warmup} warm-up steps (first step, with cuDNN autotuning or compilation, reported apart); "
            f"one fixed batch per model, data loading not timed",
            f"memory: `torch.cuda.max_memory_allocated` during the timed steps (peak; above the pre-step allocation = "
            f"what a step adds to weights, gradients, optimiser state and batch) and the bytes autograd saves for "
            f"backward in forward + loss (`saved_tensors_hooks`, each storage once, eager only)",
            f"torch.compile: backend {self.args.compile_backend}, default mode, network only (nnU-Net also "
            f"compiles the Dice loss)",
            (f"time budget {self.args.budget_s:.0f} s for all sections" if self.args.budget_s < 1e5
             else "no time budget (dry run: every row runs)"),
        ]

    def train_steps_2d(self, compiled: bool, precisions: tuple[str, ...], section: str, plan: str = "2d") -> None:
        """Train steps of the 2d models on ``plan``: the phantom's (its data) or ``2d_320``, the papers'
        320 x 320 geometry (random inputs)."""
        r = self.report
        cfg = self.manifest.get(plan)
        if cfg is None:
            r.skip(f"2d train steps on plan '{plan}': not in this bundle (prepare it again)")
            return
        key = ("train_step_compiled" if compiled else "train_step") + ("" if plan == "2d" else "_320")
        where = ("" if plan == "2d" else
                 f" (nnU-Net's 2d plan for 320 x 320 x 72 T2w at 0.69 x 0.69 x 2 mm, {cfg['arch']['kwargs']['n_stages']} "
                 f"stages; random inputs)")
        table = next((t for t in r.tables if t["key"] == key), None) or r.table(
            key, f"(a) 2d train step, batch {self.args.batch}, patch {cfg['patch_size']}"
                 + (", torch.compile" if compiled else ", eager") + where,
            ["model", "precision", "params (M)", "step (ms)", "x stock", "steps", "first step (s)", "peak (MiB)",
             "step adds (MiB)", "x stock mem", "saved for backward (MiB)", "saved / step adds", "batch that fits"]
            if not compiled else
            ["model", "precision", "step (ms)", "x stock", "x eager", "compile + first step (s)", "peak (MiB)",
             "x stock mem"])
        for precision in precisions:
            stock_row = None
            for name, tkey, builder in self.models_2d(cfg):
                what = (f"2d train step {name} {precision} {'compiled' if compiled else 'eager'}"
                        + ("" if plan == "2d" else f" ({plan} plan)"))
                if not self._fits(r, section, what, tkey, compiled, 3.0):
                    continue
                try:
                    if compiled:
                        reset_compiled()
                    torch.manual_seed(0)
                    net = builder().to(self.device)
                    x, targets = (self._batch_2d(tkey, self.args.batch) if plan == "2d"
                                  else self._batch_random(cfg, tkey, self.args.batch))
                    trainee = Trainee(net, self._trainer_rec(cfg, tkey), precision, self.device,
                                      self.args.compile_backend if compiled else None)
                    res = self._time_steps(trainee, x, targets, self._deadline(section))
                    row = {"model": name, "precision": precision, "params (M)": n_params(net),
                           "step (ms)": res["ms"], "steps": res["n"], "first step (s)": res["first_s"],
                           "compile + first step (s)": res["first_s"], "peak (MiB)": res.get("peak_mib"),
                           "step adds (MiB)": res.get("step_mib")}
                    if compiled:
                        self.compile_s.append(res["first_s"])
                        eager = self.step_ms.get((plan, name, precision, False))
                        row["x eager"] = res["ms"] / eager if eager else None
                    else:
                        sb = saved_bytes(trainee, x, targets) / MIB
                        row["saved for backward (MiB)"] = sb
                        row["saved / step adds"] = sb / res["step_mib"] if res.get("step_mib") else None
                        if self.cuda and res.get("step_mib"):
                            total = torch.cuda.get_device_properties(self.device).total_memory / MIB
                            row["batch that fits"] = int((0.9 * total - res["resident_mib"])
                                                         / (res["step_mib"] / self.args.batch))
                    self.step_ms[(plan, name, precision, compiled)] = res["ms"]
                    if stock_row is None and tkey == "stock":
                        stock_row = row
                    if stock_row is not None:
                        row["x stock"] = row["step (ms)"] / stock_row["step (ms)"]
                        if row.get("peak (MiB)") and stock_row.get("peak (MiB)"):
                            row["x stock mem"] = row["peak (MiB)"] / stock_row["peak (MiB)"]
                    table["rows"].append(row)
                    r.write("running")
                    print(f"  {what}: {res['ms']:.1f} ms (first {res['first_s']:.1f} s)", flush=True)
                except Exception as e:  # one failing configuration must not end the check
                    self._fail(what, e)
                finally:
                    trainee = net = x = targets = None
                    free(self.device)
        r.write("running")

    def train_steps_3d(self, compiled: bool, precisions: tuple[str, ...], section: str) -> None:
        r = self.report
        key = "train_step_3d_compiled" if compiled else "train_step_3d"
        table = next((t for t in r.tables if t["key"] == key), None) or r.table(
            key, f"(a) 3d train step, patch {self.cfg3['patch_size']}, each trainer's batch"
                 + (", torch.compile" if compiled else ", eager"),
            ["model", "precision", "batch", "params (M)", "step (ms)", "x stock", "first step (s)", "peak (MiB)",
             "x stock mem", "saved for backward (MiB)"])
        for precision in precisions:
            stock_row = None
            for name, tkey, builder in self.models_3d():
                what = f"3d train step {name} {precision} {'compiled' if compiled else 'eager'}"
                if not self._fits(r, section, what, tkey, compiled, 3.0):
                    continue
                try:
                    if compiled:
                        reset_compiled()
                    torch.manual_seed(0)
                    net = builder().to(self.device)
                    batch = self.cfg3[tkey]["batch_size"]
                    x, targets = self._batch_3d(tkey, batch)
                    trainee = Trainee(net, self._trainer_rec(self.cfg3, tkey), precision, self.device,
                                      self.args.compile_backend if compiled else None)
                    res = self._time_steps(trainee, x, targets, self._deadline(section))
                    row = {"model": name, "precision": precision, "batch": batch, "params (M)": n_params(net),
                           "step (ms)": res["ms"], "first step (s)": res["first_s"], "peak (MiB)": res.get("peak_mib")}
                    if compiled:
                        self.compile_s.append(res["first_s"])
                    else:
                        row["saved for backward (MiB)"] = saved_bytes(trainee, x, targets) / MIB
                    if stock_row is None and tkey == "stock":
                        stock_row = row
                    if stock_row is not None:
                        row["x stock"] = row["step (ms)"] / stock_row["step (ms)"]
                        if row.get("peak (MiB)") and stock_row.get("peak (MiB)"):
                            row["x stock mem"] = row["peak (MiB)"] / stock_row["peak (MiB)"]
                    table["rows"].append(row)
                    r.write("running")
                    print(f"  {what}: {res['ms']:.1f} ms", flush=True)
                except Exception as e:
                    self._fail(what, e)
                finally:
                    trainee = net = x = targets = None
                    free(self.device)
        r.write("running")

    def _fits(self, r, section: str, what: str, tkey: str, compiled: bool, eager_seconds: float) -> bool:
        """Whether ``what`` is to be compiled (when asked) and fits the time left in ``section``; if not,
        the report says why."""
        if compiled and not self._compile_this(tkey, what):
            return False
        left = self.budget.left(section)
        need = self._compile_estimate() if compiled else eager_seconds
        if left < need:
            r.skip(f"{what}: {left:.0f} s left in section '{section}', about {need:.0f} s needed")
            return False
        return True

    def _compile_this(self, trainer_key: str, what: str) -> bool:
        """The dry run compiles the stock networks only: the code path is the same for every model, and
        tracing MfNS_De on a CPU takes minutes (tests/test_mixed_precision.py checks it compiles)."""
        if self.dry and trainer_key != "stock":
            self.report.skip(f"{what}: the dry run compiles the stock networks only (same code path)")
            return False
        return True

    def _compile_estimate(self) -> float:
        """Seconds one more compiled configuration needs: the slowest compile so far, or a guess."""
        guess = 5.0 if self.args.compile_backend == "eager" else 75.0
        return 1.2 * max(self.compile_s) + 5 if self.compile_s else guess

    def predict(self, compiled: bool, section: str) -> None:
        r = self.report
        stack, size = padded_stack(self.val, total_stride(self.cfg2["arch"]["kwargs"]), self.cfg2["patch_size"])
        n = stack.shape[0]
        table = next((t for t in r.tables if t["key"] == "predict"), None) or r.table(
            "predict", f"(b) prediction of the {n} held-out slices ({len(self.manifest['data']['val_cases'])} cases), "
                       f"padded to {size}, batches of {self.args.predict_batch}, deep supervision off, no mirroring",
            ["model", "mode", "precision", "stack (ms)", "ms / slice", "x stock", "x eager", "first pass (s)", "passes"])
        precisions = tuple(p for p in (("fp16",) if compiled else ("fp16", "fp32")) if p in self.args.precisions)
        for precision in precisions:
            stock_ms = None
            for name, tkey, builder in self.models_2d():
                mode = "compiled" if compiled else "eager"
                what = f"prediction {name} {precision} {mode}"
                if not self._fits(r, section, what, tkey, compiled, 2.0):
                    continue
                try:
                    if compiled:
                        reset_compiled()
                    torch.manual_seed(0)
                    net = builder(False).to(self.device).eval()
                    model = torch.compile(net, backend=self.args.compile_backend) if compiled else net
                    t = time.perf_counter()
                    predict_stack(model, stack, self.args.predict_batch, precision, self.device)
                    sync(self.device)
                    first = time.perf_counter() - t
                    if compiled:
                        self.compile_s.append(first)
                    times, deadline = [], self._deadline(section)
                    for _ in range(self.args.predict_passes):
                        t = time.perf_counter()
                        predict_stack(model, stack, self.args.predict_batch, precision, self.device)
                        sync(self.device)
                        times.append(time.perf_counter() - t)
                        if time.perf_counter() > deadline:
                            break
                    ms = 1e3 * statistics.median(times)
                    row = {"model": name, "mode": mode, "precision": precision, "stack (ms)": ms, "ms / slice": ms / n,
                           "first pass (s)": first, "passes": len(times)}
                    if stock_ms is None:
                        stock_ms = ms
                    row["x stock"] = ms / stock_ms
                    eager = next((e["stack (ms)"] for e in table["rows"] if e["model"] == name
                                  and e["mode"] == "eager" and e["precision"] == precision), None)
                    row["x eager"] = ms / eager if eager else None
                    table["rows"].append(row)
                    r.write("running")
                    print(f"  {what}: {ms:.1f} ms for {n} slices", flush=True)
                except Exception as e:
                    self._fail(what, e)
                finally:
                    model = net = None
                    free(self.device)
        r.write("running")

    def short_training(self) -> None:
        """MfNS_De (default) and stock 2d, alternating steps; held-out Dice at four points."""
        r, section = self.report, "training"
        a = self.args
        specs = [("stock 2d (PlainConvUNet)", "stock", lambda: build_stock(self.cfg2, True)),
                 ("MfNS_De", "mfns_de", lambda: self._mfns("default", True))]
        batches = {k: (self.cfg2[k]["batch_size"] if not self.dry else 2) for _, k, _ in specs}
        # steps that fit: the eager fp16 step times of section (a), scaled to each trainer's batch
        est = [self.step_ms.get(("2d", name, "fp16", False)) for name, _, _ in specs]
        planned = a.train_steps
        left = self.budget.left(section)
        if all(est):
            pair_s = sum(ms / 1e3 * max(1.0, batches[k] / a.batch) for ms, (_, k, _) in zip(est, specs)) * 1.15
            fit = int(0.85 * (left - 10) / pair_s) // 4 * 4
            steps = max(0, min(planned, fit))
        else:  # no fp16 step times to size it by (section (a) skipped or failed)
            steps = planned if left > 30 else 0
        intro = (f"Both trained from the same seed in one loop, one step each in turn (same number of steps); "
                 f"autocast float16 + GradScaler, eager; each trainer's batch ({batches['stock']} stock, "
                 f"{batches['mfns_de']} MfNS_De), loss, optimiser and schedule (stock: poly decay over the steps, "
                 f"updated every step instead of every epoch); patches of {self.cfg2['patch_size']} drawn as nnU-Net's "
                 f"2d loader ({self.cfg2['oversample_foreground']:.2f} of each batch centred on foreground), random "
                 f"flips only. Held-out Dice: argmax of full slices (deep supervision off), foreground Dice per "
                 f"held-out case over its stacked slices in nnU-Net's preprocessed space, mean over cases (pooled in "
                 f"brackets). Planned {planned} steps"
                 + (f"; {steps} fitted the section's {left:.0f} s." if left < 1e5 else "."))
        table = r.table("training", "(c) short training, held-out Dice", ["step", "model", "samples seen",
                                                                         "held-out Dice (pooled)", "x stock",
                                                                         "minus stock", "train loss (last 20)",
                                                                         "ms / step"],
                        intro)
        if steps < 4:
            r.skip(f"short training: only {steps} steps fit the {left:.0f} s left")
            return
        stack, _size = padded_stack(self.val, total_stride(self.cfg2["arch"]["kwargs"]), self.cfg2["patch_size"])
        runs = []
        try:
            for i, (name, key, builder) in enumerate(specs):
                torch.manual_seed(1)
                net = builder().to(self.device)
                rec = self._trainer_rec(self.cfg2, key)
                runs.append({"name": name, "key": key, "net": net, "rec": rec,
                             "trainee": Trainee(net, rec, "fp16", self.device),
                             "sampler": PatchSampler(self.train, self.cfg2["patch_size"],
                                                     self.cfg2["oversample_foreground"], seed=100 + i),
                             "losses": [], "time": 0.0})
            deadline = self._deadline(section)
            checkpoints = sorted({max(1, steps * q // 4) for q in (1, 2, 3, 4)})
            done = 0
            for step in range(1, steps + 1):
                for run in runs:
                    t = time.perf_counter()
                    opt_rec = run["rec"]["optimizer"]
                    lr = opt_rec["lr"] * (1 - (step - 1) / steps) ** opt_rec["poly_exponent"]
                    for g in run["trainee"].opt.param_groups:
                        g["lr"] = lr
                    x, seg = run["sampler"].batch(batches[run["key"]])
                    targets = ds_targets(seg, self.cfg2[run["key"]]["ds_scales"],
                                         self.cfg2[run["key"]]["target_downsampling"])
                    run["losses"].append(run["trainee"].step(x, targets))
                    sync(self.device)
                    run["time"] += time.perf_counter() - t
                done = step
                last = time.perf_counter() > deadline
                if step in checkpoints or last:
                    self._evaluate(table, runs, step, batches, stack)
                    r.write("running")
                if last and step < steps:
                    r.skip(f"short training stopped at step {step} of {steps}: section time used up")
                    break
            r.notes.append(f"short training: {done} steps each; wall time in the training loop (sampling, step, "
                           f"synchronisation): " + ", ".join(f"{run['name']} {run['time']:.1f} s" for run in runs))
        except Exception as e:
            self._fail("short training", e)
        finally:
            runs = None
            free(self.device)
        r.write("running")

    def _evaluate(self, table, runs, step, batches, stack) -> None:
        stock = None
        for run in runs:
            set_deep_supervision(run["net"], False)
            run["net"].eval()
            pred = predict_stack(run["net"], stack, self.args.predict_batch, "fp16", self.device)
            run["net"].train()
            set_deep_supervision(run["net"], True)
            mean, pooled = held_out_dice(pred, self.val)
            losses = torch.stack(run["losses"][-20:]).float().cpu().numpy()
            row = {"step": step, "model": run["name"], "samples seen": step * batches[run["key"]],
                   "held-out Dice (pooled)": f"{mean:.3f} ({pooled:.3f})", "dice": mean, "dice_pooled": pooled,
                   "train loss (last 20)": float(np.mean(losses)), "ms / step": 1e3 * run["time"] / step}
            if stock is None:
                stock = mean
            row["x stock"] = mean / stock if stock > 0 else None
            row["minus stock"] = f"{mean - stock:+.3f}"
            table["rows"].append(row)
            print(f"  training step {step}: {run['name']} held-out Dice {mean:.3f}", flush=True)

    def run(self) -> int:
        r, a = self.report, self.args
        self.failures: list[str] = []
        self.settings()
        r.write("running")
        print(r.settings[0].replace("*", ""), flush=True)
        precisions = tuple(p for p in PRECISIONS if p in a.precisions)
        for name in a.skip:
            r.skip(f"section '{name}': --skip")
        if "train_step" not in a.skip:
            self.train_steps_2d(False, precisions, "train_step")
        if "train_step_320" not in a.skip:
            self.train_steps_2d(False, tuple(p for p in ("fp32", "fp16") if p in precisions), "train_step_320", "2d_320")
        if "train_step_3d" not in a.skip:
            self.train_steps_3d(False, precisions, "train_step_3d")
        if "predict" not in a.skip:
            self.predict(False, "predict")
        if "training" not in a.skip:
            self.short_training()
        if "compile" not in a.skip:
            # most telling first: nnU-Net's GPU mode (float16 autocast), then bfloat16, then float32
            order = [p for p in ("fp16", "bf16", "fp32") if p in precisions]
            self.train_steps_2d(True, tuple(order[:1]), "compile")
            self.predict(True, "compile")
            self.train_steps_3d(True, tuple(order[:1]), "compile")
            if order[1:] and self.dry:
                r.skip(f"compiled 2d train steps in {', '.join(order[1:])}: the dry run compiles {order[0]} only "
                       f"(same code path)")
            elif order[1:]:
                self.train_steps_2d(True, tuple(order[1:]), "compile")
        r.notes.append(f"whole check {self.budget.elapsed():.0f} s" + (f" of a {a.budget_s:.0f} s budget" if a.budget_s < 1e5 else ""))
        status = "complete" if not self.failures else f"complete with {len(self.failures)} failure(s)"
        r.write(status)
        print(f"report: {r.md_path} ({status})", flush=True)
        return 0 if not self.failures else 3


def _opt_text(o: dict) -> str:
    extra = f", momentum {o['momentum']}{' nesterov' if o.get('nesterov') else ''}" if o["type"] == "SGD" else ""
    sched = f"poly {o['poly_exponent']:g}" if o["poly_exponent"] else "constant lr"
    return f"{o['type']} lr {o['lr']:g}{extra}, weight decay {o['weight_decay']:g}, {sched}"


def _loss_text(rec: dict) -> str:
    parts = []
    if rec["weight_dice"]:
        parts.append(f"{rec['weight_dice']:g} x soft Dice ({'batch' if rec['batch_dice'] else 'per sample'}, "
                     f"{'with' if rec['do_bg'] else 'no'} background)")
    if rec["weight_ce"]:
        parts.append(f"{rec['weight_ce']:g} x cross-entropy")
    return " + ".join(parts)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(HERE / "bundle"), help="bundle folder made by prepare.py")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"),
                    help="folder for the report (default $OUT, else benchmarks/results)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if PyTorch sees one), cuda, cpu")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny scale: few steps, small batch, compile with the eager backend")
    ap.add_argument("--budget-s", type=float, help="seconds for all sections (default 480; none in a dry run, so "
                                                   "that every row runs however slow the CPU)")
    ap.add_argument("--batch", type=int, default=4, help="2d train-step batch (default 4)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps after the first (default 5)")
    ap.add_argument("--train-steps", type=int, default=2400, help="short-training steps per model, before the budget cap (default 2400)")
    ap.add_argument("--predict-batch", type=int, default=32, help="slices per forward pass in prediction (default 32)")
    ap.add_argument("--predict-passes", type=int, default=5, help="timed passes over the held-out stack (default 5)")
    ap.add_argument("--precisions", default="fp32,fp16,bf16", help="comma-separated subset of fp32,fp16,bf16")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; eager in a dry run)")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out: " + ", ".join(SECTIONS))
    args = ap.parse_args(argv)
    args.skip = [x.strip() for x in args.skip.split(",") if x.strip()]
    if [x for x in args.skip if x not in SECTIONS]:
        ap.error(f"--skip: unknown section(s) {', '.join(x for x in args.skip if x not in SECTIONS)} "
                 f"(choose from {', '.join(SECTIONS)})")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in args.precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"--precisions: unknown {', '.join(bad)} (choose from {', '.join(PRECISIONS)})")
    if args.dry_run:
        if args.device == "auto":
            args.device = "cpu"
        args.batch = min(args.batch, 2)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 0)
        args.train_steps = min(args.train_steps, 4)
        args.predict_batch, args.predict_passes = min(args.predict_batch, 4), min(args.predict_passes, 1)
        args.budget_s = 1e6 if args.budget_s is None else args.budget_s
        args.compile_backend = args.compile_backend or "eager"
    args.budget_s = 480.0 if args.budget_s is None else args.budget_s
    args.compile_backend = args.compile_backend or "inductor"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.dry_run:
            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        return Check(args).run()
    except CheckError as e:
        print(f"gpu_check.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
