"""bfloat16 mixed precision on the CPU (``train.cpu_amp``): what runs in bfloat16, what stays float32."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from fewlabel.config.segmentation import TCSMConfig
from fewlabel.engines.tcsm import TCSMTrainer
from fewlabel.utils.runtime import CPUAutocast, autocast


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))


class ConvDtypes:
    """Record the output dtype of every convolution run in training mode."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def __enter__(self) -> ConvDtypes:
        def hook(module: nn.Module, args, out) -> None:
            if isinstance(module, nn.Conv2d) and module.training:
                self.dtypes.append(out.dtype)

        self.handle = register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_autocast_context_picks_the_device_and_dtype():
    cpu = torch.device("cpu")
    x = torch.randn(4, 4)
    with autocast(cpu, enabled=True, cpu_bf16=True):
        assert (x @ x).dtype == torch.bfloat16
    # train.amp alone is a CUDA setting: on the CPU it changes nothing.
    with autocast(cpu, enabled=True):
        assert (x @ x).dtype == torch.float32


def test_cpu_autocast_wrapper_runs_bfloat16_and_returns_float32():
    net = conv_net()
    wrapped = CPUAutocast(net)
    x = torch.randn(2, 1, 8, 8)
    with ConvDtypes() as seen:
        out = wrapped(x)
    assert seen.dtypes == [torch.bfloat16, torch.bfloat16]
    assert out.dtype == torch.float32
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    # Close to the float32 result: bfloat16 keeps about three significant digits.
    torch.testing.assert_close(out, net(x), rtol=0.05, atol=0.05)
    assert set(wrapped.state_dict()) == {f"net.{k}" for k in net.state_dict()}


def test_tcsm_trainer_with_cpu_amp_trains_in_bfloat16():
    net = conv_net()
    before = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(1)
    labelled = [
        {"image": torch.randn(2, 1, 12, 12, generator=g), "label": torch.randint(0, 2, (2, 1, 12, 12))}
    ]
    unlabelled = [{"image": torch.randn(2, 1, 12, 12, generator=g)}]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    config = TCSMConfig(enabled=True, rampup_iterations=0, consistency_weight=1.0)
    losses: list[torch.dtype] = []

    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        losses.append(logits.dtype)
        return nn.functional.cross_entropy(logits, label[:, 0])

    trainer = TCSMTrainer("cpu", 1, labelled, unlabelled, net, optimizer, loss, config, cpu_amp=True)
    with ConvDtypes() as seen:
        trainer.run()
    assert seen.dtypes and set(seen.dtypes) == {torch.bfloat16}
    assert losses == [torch.float32]
    out = trainer.state.output
    assert torch.isfinite(out["loss"]) and out["cons_loss"].dtype == torch.float32
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert all(v.dtype == torch.float32 for v in trainer.teacher.state_dict().values())


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_resumed_supervised_trainer_keeps_its_gradient_scale(monkeypatch):
    from monai.engines import SupervisedTrainer

    from fewlabel.engines.segmentation import _restore_scaler_at_start, _scaler_state

    # MONAI builds a CUDA GradScaler in Trainer.run; the CPU one behaves the same and runs here.
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", lambda: torch.amp.GradScaler("cpu"))

    def trainer() -> SupervisedTrainer:
        net = torch.nn.Conv2d(1, 2, 3, padding=1)
        batches = [{"image": torch.randn(2, 1, 8, 8), "label": torch.randint(0, 2, (2, 8, 8))}] * 2
        return SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=1,
            train_data_loader=batches,
            network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            loss_function=torch.nn.CrossEntropyLoss(),
            amp=True,
            decollate=False,
        )

    first = trainer()
    first.run()
    saved = _scaler_state(first)
    assert saved["scale"] == 2.0**16 and saved["_growth_tracker"] == 2
    saved = {**saved, "scale": 128.0}  # as after overflowing steps halved it

    resumed = trainer()
    scales = []
    resumed.add_event_handler(Events.ITERATION_STARTED, lambda e: scales.append(e.scaler.get_scale()))
    _restore_scaler_at_start(resumed, saved)
    resumed.run()
    assert scales[0] == 128.0

    fresh = trainer()
    _restore_scaler_at_start(fresh, None)  # no AMP when saved: the fresh scale stays
    fresh.run()
    assert _scaler_state(fresh)["scale"] == 2.0**16
