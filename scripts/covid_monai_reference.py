"""Plain-MONAI reference for the COVID-SemiSeg supervised run, scored by ``fewlabel evaluate``.

The yardstick that fewlabel's supervised 2D pipeline is compared with: a MONAI BasicUNet
trained with MONAI's ``DiceCELoss`` and Adam (1e-3, constant), random quarter turns and
flips, 600 iterations of batch 6 on the 50 labelled slices resized to 192×192. Nothing of
fewlabel's training code is used; the test masks it predicts (logits upsampled bilinearly
to each slice's native size, arg-max) are written as PNGs and scored with
``fewlabel evaluate --pred --gt``, so both sides share one Dice definition.

Usage::

    .venv/bin/python scripts/covid_monai_reference.py --data ../shared/data/covid_semiseg \\
        --output-dir runs/covid-monai-reference --threads 1

``--cases`` restricts training to some labelled slices (the 10-label arm of the
label-efficiency study, for example).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewlabel.utils.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("background", "ggo", "consolidation")


def load_pair(image: Path, mask: Path | None, size: int) -> dict:
    """Read a slice (grey, scaled to [0, 1]) and its mask, both resized to ``size``.

    Args:
        image: 8-bit image file.
        mask: label PNG (values 0/1/2) or ``None``.
        size: output side length.

    Returns:
        ``{"image": (1, size, size) float32, "label": (1, size, size) int64}``.
    """
    img = Image.open(image).convert("L")
    out = {"image": np.asarray(img.resize((size, size), Image.BILINEAR), np.float32)[None] / 255.0}
    if mask is not None:
        lab = Image.open(mask)
        out["label"] = np.asarray(lab.resize((size, size), Image.NEAREST), np.int64)[None]
    return out


def main(argv: list[str] | None = None) -> int:
    """Train, predict the test slices and score them.

    Args:
        argv: command-line arguments.

    Returns:
        Exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "covid_semiseg"))
    parser.add_argument("--output-dir", default="runs/covid-monai-reference")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--slice-size", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        metavar="ID",
        help="train on these labelled slices only (file stems), e.g. the ones a fewlabel run with "
        "data.labeled_count logs as 'labelled training cases'",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier result in --output-dir")
    args = parser.parse_args(argv)
    earlier = [Path(args.output_dir) / name for name in ("reference.json", "eval")]
    if any(p.exists() for p in earlier) and not args.overwrite:
        # Checked before training: the evaluation would replace the earlier seed's report.
        print(
            f"{args.output_dir} holds a result already: pass --overwrite or choose another --output-dir",
            file=sys.stderr,
        )
        return 2

    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet
    from monai.transforms import Compose, RandFlipd, RandRotate90d
    from monai.utils import set_determinism

    data = Path(args.data)
    if not (data / "train" / "images").is_dir():
        print(f"COVID-SemiSeg not found at {data}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    set_determinism(args.seed)
    images = sorted((data / "train" / "images").glob("*.jpg"))
    if args.cases is not None:
        wanted = {case.strip(",") for case in args.cases}
        missing = sorted(wanted - {p.stem for p in images})
        if missing:
            print(
                f"--cases: no training slice named {', '.join(missing)} in {data / 'train' / 'images'}",
                file=sys.stderr,
            )
            return 2
        images = [p for p in images if p.stem in wanted]
    if len(images) < args.batch_size:
        # The loader drops incomplete batches (every step sees --batch-size slices): with fewer
        # slices it yields none, and the iteration loop would never end.
        print(
            f"{len(images)} training slice(s) but --batch-size {args.batch_size}: give at least "
            f"{args.batch_size} slices with --cases, or a smaller --batch-size",
            file=sys.stderr,
        )
        return 2
    train = [load_pair(p, data / "train" / "masks" / f"{p.stem}.png", args.slice_size) for p in images]
    print(f"training on {len(train)} labelled slices", flush=True)
    out = Path(args.output_dir)
    (out / "pred").mkdir(parents=True, exist_ok=True)
    keys = ["image", "label"]
    augment = Compose(
        [
            RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
        ]
    )
    loader = DataLoader(Dataset(train, augment), batch_size=args.batch_size, shuffle=True, drop_last=True)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=len(CLASSES))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    start = time.perf_counter()
    done = 0
    net.train()
    while done < args.iterations:
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            done += 1
            if done % 50 == 0:
                print(f"iteration {done}: loss {loss.item():.4f}", flush=True)
            if done == args.iterations:
                break
    minutes = (time.perf_counter() - start) / 60

    net.eval()
    with torch.no_grad():
        for path in sorted((data / "test" / "images").glob("*.jpg")):
            width, height = Image.open(path).size
            x = torch.from_numpy(load_pair(path, None, args.slice_size)["image"])[None]
            logits = F.interpolate(net(x), size=(height, width), mode="bilinear", align_corners=False)
            mask = logits.argmax(1)[0].numpy().astype(np.uint8)
            Image.fromarray(mask).save(out / "pred" / f"{path.stem}.png")

    from fewlabel.cli import main as fewlabel_main

    status = fewlabel_main(
        [
            "evaluate",
            "--pred",
            str(out / "pred"),
            "--gt",
            str(data / "test" / "masks"),
            "--classes",
            *CLASSES,
            "--merge",
            "infection=1,2",
            "--output",
            str(out / "eval"),
            *(["--overwrite"] if args.overwrite else []),
        ]
    )
    if status != 0:
        return status
    mean = json.loads((out / "eval" / "summary.json").read_text())["mean"]
    dice = {
        name: mean[idx]["Dice"] for idx, name in (("3", "infection"), ("1", "ggo"), ("2", "consolidation"))
    }
    result = {"seed": args.seed, "labelled": len(train), "train_minutes": round(minutes, 2), **dice}
    atomic_write_text(out / "reference.json", json.dumps(result, indent=2))
    print(
        f"plain MONAI, seed {args.seed}: infection {dice['infection']:.3f}, GGO {dice['ggo']:.3f}, "
        f"consolidation {dice['consolidation']:.3f}; training {minutes:.1f} min"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
