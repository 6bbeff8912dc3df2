"""Benchmark: one TCSM iteration against one supervised iteration on the same network.

Runs ``TCSMTrainer`` for a few iterations on fixed in-memory batches and reports the median
time of an iteration (forward, losses, backward, optimizer step and EMA update; measured
between Ignite's ``ITERATION_STARTED`` and ``ITERATION_COMPLETED``, after warm-up) for:

* ``supervised``: the labelled batch only (``tcsm.enabled`` off);
* ``tcsm``: the labelled batch plus an unlabelled batch, consistency on both;
* ``tcsm-equal-images``: as many images in total as the supervised case (half labelled,
  half unlabelled), which isolates the overhead of the teacher and the transforms;
* ``tcsm+copy-paste``: the ``tcsm`` case with the copy-paste term (``tcsm.copy_paste_weight``),
  which adds one student pass over the mixed images.

Example::

    python scripts/bench_tcsm_iteration.py --device cuda --size 192 --batch 6 --unlabeled-batch 6 --amp
    python scripts/bench_tcsm_iteration.py --device cpu --size 64 --batch 2 --unlabeled-batch 2 --reps 5
    python scripts/bench_tcsm_iteration.py --device cpu --threads 1 --reps 5 --cpu-amp
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ignite.engine import Events
from monai.losses import DiceLoss
from monai.networks.nets import BasicUNet

from fewlabel.config.segmentation import TCSMConfig
from fewlabel.engines.tcsm import TCSMTrainer
from fewlabel.utils.runtime import select_device


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--size", type=int, default=192, help="in-plane size of the square images")
    parser.add_argument("--depth", type=int, default=0, help="3D depth (0 = 2D images)")
    parser.add_argument("--channels", type=int, default=1, help="input channels (slab size for 2.5D)")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=6, help="labelled images per iteration")
    parser.add_argument("--unlabeled-batch", type=int, default=6, help="unlabelled images per iteration")
    parser.add_argument("--features", type=int, nargs=6, default=(32, 32, 64, 128, 256, 32))
    parser.add_argument("--reps", type=int, default=20, help="timed iterations per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--amp", action="store_true", help="CUDA mixed precision")
    parser.add_argument("--cpu-amp", action="store_true", help="bfloat16 mixed precision on the CPU")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def _batch(n: int, args: argparse.Namespace, device: torch.device, labelled: bool) -> dict:
    spatial = (args.size, args.size) + ((args.depth,) if args.depth else ())
    batch = {"image": torch.randn(n, args.channels, *spatial, device=device)}
    if labelled:
        batch["label"] = torch.randint(0, args.classes, (n, 1, *spatial), device=device)
    return batch


def _time_case(
    args: argparse.Namespace,
    device: torch.device,
    n_labeled: int,
    n_unlabeled: int,
    enabled: bool,
    copy_paste: bool = False,
) -> float:
    """Median seconds per iteration of one configuration."""
    torch.manual_seed(0)
    net = BasicUNet(
        spatial_dims=3 if args.depth else 2,
        in_channels=args.channels,
        out_channels=args.classes,
        features=tuple(args.features),
    ).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    total = args.warmup + args.reps
    labelled = [_batch(n_labeled, args, device, True)] * total
    unlabelled = [_batch(n_unlabeled, args, device, False)] if n_unlabeled else None
    config = TCSMConfig(
        enabled=enabled, rampup_iterations=0, apply_to_labeled=True, copy_paste_weight=float(copy_paste)
    )
    trainer = TCSMTrainer(
        device,
        1,
        labelled,
        unlabelled,
        net,
        optimizer,
        DiceLoss(softmax=True, to_onehot_y=True),
        config,
        amp=args.amp,
        cpu_amp=getattr(args, "cpu_amp", False),
    )
    # With the device given: a bare synchronize() waits for the current device (cuda:0), not
    # for the --device cuda:N the iterations run on, and would time nothing.
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    start = [0.0]

    @trainer.on(Events.ITERATION_STARTED)
    def _start(_):
        sync()
        start[0] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop(engine):
        sync()
        if engine.state.iteration > args.warmup:
            times.append(time.perf_counter() - start[0])

    trainer.run()
    return statistics.median(times)


def main() -> None:
    """Run the three cases and print a table with the ratio to supervised training."""
    args = _parse()
    device = select_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    half = max(1, args.batch // 2)
    cases = [
        ("supervised", args.batch, 0, False, False),
        ("tcsm", args.batch, args.unlabeled_batch, True, False),
        ("tcsm-equal-images", half, max(1, args.batch - half), True, False),
    ]
    if args.unlabeled_batch:
        cases.append(("tcsm+copy-paste", args.batch, args.unlabeled_batch, True, True))
    shape = f"{args.size}x{args.size}" + (f"x{args.depth}" if args.depth else "")
    print(
        f"device={device} input={args.channels}x{shape} features={tuple(args.features)} "
        f"amp={args.amp and device.type == 'cuda'} cpu_amp={args.cpu_amp and device.type == 'cpu'} "
        f"reps={args.reps} warmup={args.warmup}"
        + (f" threads={args.threads}" if device.type == "cpu" else "")
    )
    print(f"{'case':<20}{'labelled':>9}{'unlabelled':>11}{'student imgs':>13}{'median ms':>11}{'ratio':>8}")
    # One untimed pass first: the first network built in a process pays one-off allocator and
    # kernel-selection costs that would otherwise inflate whichever case runs first.
    _time_case(args, device, cases[1][1], cases[1][2], True)
    baseline = None
    for name, n_labeled, n_unlabeled, enabled, copy_paste in cases:
        seconds = _time_case(args, device, n_labeled, n_unlabeled, enabled, copy_paste)
        baseline = baseline or seconds
        student_images = n_labeled + n_unlabeled + (min(n_labeled, n_unlabeled) if copy_paste else 0)
        print(
            f"{name:<20}{n_labeled:>9}{n_unlabeled:>11}{student_images:>13}"
            f"{seconds * 1e3:>11.1f}{seconds / baseline:>7.2f}x"
        )
    print("target: tcsm-equal-images <= 1.6x supervised (the teacher adds one no-grad forward)")


if __name__ == "__main__":
    main()
