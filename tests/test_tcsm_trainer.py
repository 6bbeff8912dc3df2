"""TCSMTrainer: consistency gradients, EMA teacher, ramp-up, supervised reduction, resume."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from monai.losses import DiceLoss
from monai.networks.nets import BasicUNet
from torch import nn

from fewlabel.config.segmentation import TCSMConfig
from fewlabel.engines import tcsm as tcsm_module
from fewlabel.engines.checkpoint import load_checkpoint, save_checkpoint
from fewlabel.engines.tcsm import TCSMTrainer
from fewlabel.errors import CheckpointError, DataError
from fewlabel.transforms.consistency import InPlaneTransform


def tiny_net(dims: int = 2, classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    return nn.Sequential(conv(1, 4, 3, padding=1), bn(4), nn.ReLU(), conv(4, classes, 3, padding=1))


def batches(n: int, batch: int, shape: tuple[int, ...], labelled: bool = True, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        item = {"image": torch.randn(batch, 1, *shape, generator=g)}
        if labelled:
            item["label"] = torch.randint(0, 2, (batch, 1, *shape), generator=g)
        out.append(item)
    return out


def dice() -> nn.Module:
    return DiceLoss(softmax=True, to_onehot_y=True)


def make_trainer(
    net=None, labelled=None, unlabelled=None, epochs=1, lr=0.05, opt="sgd", **tcsm
) -> TCSMTrainer:
    net = net if net is not None else tiny_net()
    optimizer = (torch.optim.SGD if opt == "sgd" else torch.optim.Adam)(net.parameters(), lr=lr)
    config = TCSMConfig(**{"enabled": True, "rampup_iterations": 0, **tcsm})
    labelled = labelled if labelled is not None else batches(2, 2, (16, 24))
    return TCSMTrainer("cpu", epochs, labelled, unlabelled, net, optimizer, dice(), config)


def record_outputs(trainer: TCSMTrainer) -> list[dict]:
    seen: list[dict] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(dict(e.state.output)))
    return seen


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class ZeroLoss(nn.Module):
    """A supervised loss whose gradient is exactly zero."""

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return logits.sum() * 0.0


def test_teacher_is_a_frozen_eval_copy():
    trainer = make_trainer()
    student, teacher = trainer.student, trainer.teacher
    assert teacher is not student and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for a, b in zip(student.parameters(), teacher.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


@pytest.mark.parametrize("kind", ["mse", "kl", "ce"])
def test_consistency_term_alone_trains_the_student(kind):
    net = tiny_net()
    before = params(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    # threshold 0: an untrained teacher is rarely 95% sure of anything.
    config = TCSMConfig(
        enabled=True,
        rampup_iterations=0,
        consistency_weight=10.0,
        apply_to_labeled=False,
        consistency_loss=kind,
        consistency_threshold=0.0,
    )
    trainer = TCSMTrainer(
        "cpu",
        1,
        batches(1, 2, (16, 16)),
        batches(1, 4, (16, 16), False, seed=2),
        net,
        optimizer,
        ZeroLoss(),
        config,
    )
    grads: list[torch.Tensor] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _grab(_):
        grads.extend(p.grad.detach().clone() for p in net.parameters() if p.grad is not None)

    outputs = record_outputs(trainer)
    trainer.run()
    assert outputs[0]["cons_weight"] == 10.0
    # Only the ce kind counts pixels; at threshold 0 it counts them all.
    assert outputs[0].get("cons_counted") == (1.0 if kind == "ce" else None)
    assert outputs[0]["cons_loss"] > 0 and outputs[0]["sup_loss"] == 0
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params(net), strict=True))
    assert all(p.grad is None for p in trainer.teacher.parameters())


def test_consistency_term_with_weight_zero_leaves_the_student_alone():
    net = tiny_net()
    before = params(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    config = TCSMConfig(enabled=True, rampup_iterations=0, consistency_weight=0.0)
    trainer = TCSMTrainer(
        "cpu", 1, batches(1, 2, (16, 16)), batches(1, 2, (16, 16), False), net, optimizer, ZeroLoss(), config
    )
    trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, params(net), strict=True))


def test_ema_update_matches_formula_after_one_step():
    decay = 0.9
    trainer = make_trainer(
        labelled=batches(1, 2, (16, 24)), unlabelled=batches(1, 2, (16, 24), False), ema_decay=decay
    )
    teacher_before = params(trainer.teacher)
    trainer.run()
    assert trainer.state.ema_momentum == pytest.approx(1 - decay)
    student_after = params(trainer.student)
    for t0, s1, t1 in zip(teacher_before, student_after, params(trainer.teacher), strict=True):
        assert torch.allclose(t1, decay * t0 + (1 - decay) * s1, atol=1e-6)
    assert not torch.equal(student_after[0], teacher_before[0])  # the step did move the student
    # Buffers (batch-norm statistics) are copied from the student.
    for (name, tb), sb in zip(trainer.teacher.named_buffers(), trainer.student.buffers(), strict=True):
        assert torch.equal(tb, sb), name


def test_ema_warmup_starts_with_a_copy_of_the_student():
    trainer = make_trainer(labelled=batches(1, 2, (16, 24)), ema_decay=0.99, ema_warmup_iterations=5)
    trainer.run()
    for s, t in zip(trainer.student.parameters(), trainer.teacher.parameters(), strict=True):
        assert torch.equal(s, t)
    assert trainer.state.ema_momentum == 1.0


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_ema_decay_extremes(decay):
    trainer = make_trainer(labelled=batches(2, 2, (16, 24)), ema_decay=decay)
    initial = params(trainer.teacher)
    trainer.run()
    same_as = initial if decay == 1.0 else params(trainer.student)
    assert all(torch.equal(a, b) for a, b in zip(params(trainer.teacher), same_as, strict=True))


def test_rampup_weights_follow_the_formula():
    trainer = make_trainer(
        labelled=batches(6, 2, (16, 24)),
        unlabelled=batches(4, 2, (16, 24), False),
        rampup_iterations=4,
        consistency_weight=2.0,
    )
    outputs = record_outputs(trainer)
    trainer.run()
    weights = [o["cons_weight"] for o in outputs]
    assert weights == pytest.approx([2.0 * math.exp(-5 * (1 - min(i / 4, 1)) ** 2) for i in range(6)])
    for o in outputs:
        assert torch.isclose(o["loss"], o["sup_loss"] + o["cons_weight"] * o["cons_loss"], atol=1e-6)


def _supervised_reference(net: nn.Module, data: list[dict], steps: int) -> nn.Module:
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    loss_fn = dice()
    net.train()
    for i in range(steps):
        batch = data[i % len(data)]
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(batch["image"]), batch["label"]).backward()
        optimizer.step()
    return net


@pytest.mark.parametrize(
    "mode", ["no-unlabelled-data", "tcsm-disabled"], ids=["no-unlabelled-data", "tcsm-disabled"]
)
def test_reduces_to_supervised_training(mode):
    data = batches(3, 2, (16, 24))
    if mode == "no-unlabelled-data":
        tcsm = {"apply_to_labeled": False}
        unlabelled = None
    else:
        tcsm = {"enabled": False}
        unlabelled = batches(2, 2, (16, 24), False)
    trainer = make_trainer(tiny_net(seed=5), data, unlabelled, epochs=2, lr=0.01, opt="adam", **tcsm)
    outputs = record_outputs(trainer)
    trainer.run()
    reference = _supervised_reference(tiny_net(seed=5), data, steps=6)
    for a, b in zip(trainer.student.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(o["cons_weight"] == 0.0 and o["cons_loss"] == 0 for o in outputs)


def test_consistency_on_labelled_data_only():
    trainer = make_trainer(labelled=batches(2, 2, (16, 16)), unlabelled=None, apply_to_labeled=True)
    outputs = record_outputs(trainer)
    trainer.run()
    assert all(o["cons_loss"] > 0 for o in outputs)


class _Counting:
    """Batches that note the index of each one served, pass after pass."""

    def __init__(self, batches: list, served: list[int]) -> None:
        self.batches, self.served = batches, served

    def __iter__(self):
        for i, b in enumerate(self.batches):
            self.served.append(i)
            yield b


def test_unlabelled_loader_is_cycled_independently():
    unlabelled = batches(2, 3, (16, 24), False)
    served: list[int] = []

    trainer = make_trainer(labelled=batches(5, 2, (16, 24)), unlabelled=_Counting(unlabelled, served))
    trainer.run()
    assert served == [0, 1, 0, 1, 0]


def test_unlabelled_images_of_another_shape_still_work():
    trainer = make_trainer(labelled=batches(2, 2, (16, 24)), unlabelled=batches(1, 3, (16, 16), False))
    outputs = record_outputs(trainer)
    trainer.run()
    assert len(outputs) == 2 and all(o["cons_loss"] > 0 for o in outputs)


def test_empty_unlabelled_loader_is_a_data_error():
    trainer = make_trainer(unlabelled=[])
    with pytest.raises(DataError, match="no batches"):
        trainer.run()


def test_3d_inputs_run():
    net = tiny_net(dims=3)
    trainer = make_trainer(
        net, batches(2, 1, (16, 24, 8)), batches(1, 2, (16, 24, 8), False), scale=0.2, consistency_loss="kl"
    )
    outputs = record_outputs(trainer)
    trainer.run()
    assert len(outputs) == 2 and all(torch.isfinite(o["loss"]) and o["cons_loss"] > 0 for o in outputs)


@pytest.mark.parametrize("plane_axis", [0, 1, 2])
def test_3d_transformations_leave_the_plane_axis_alone(monkeypatch, plane_axis):
    # A quarter turn shows which two axes T acts on; the through-plane axis is the odd size out.
    monkeypatch.setattr(
        tcsm_module, "sample_transforms", lambda n, **kwargs: [InPlaneTransform(1, False)] * n
    )
    shape = [8, 8, 8]
    shape[plane_axis] = 4
    torch.manual_seed(0)
    pointwise = nn.Sequential(nn.Conv3d(1, 4, 1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    unlabelled = batches(1, 2, tuple(shape), False, seed=3)
    net_optimizer = torch.optim.SGD(pointwise.parameters(), lr=0.0)
    config = TCSMConfig(enabled=True, rampup_iterations=0, apply_to_labeled=False)
    trainer = TCSMTrainer(
        "cpu",
        1,
        batches(1, 2, tuple(shape)),
        unlabelled,
        pointwise,
        net_optimizer,
        ZeroLoss(),
        config,
        plane_axis=plane_axis,
    )
    seen: list[torch.Tensor] = []
    trainer.teacher.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    outputs = record_outputs(trainer)
    trainer.run()
    in_plane = tuple(2 + a for a in range(3) if a != plane_axis)
    assert torch.equal(seen[0], torch.rot90(unlabelled[0]["image"], 1, dims=in_plane))
    # A pointwise network commutes with T, so aligned outputs agree exactly.
    assert outputs[0]["cons_loss"] == pytest.approx(0.0, abs=1e-12)


def test_plane_axis_must_be_a_spatial_axis():
    with pytest.raises(ValueError, match="plane_axis"):
        TCSMTrainer(
            "cpu",
            1,
            batches(1, 2, (8, 8)),
            None,
            tiny_net(),
            torch.optim.SGD(tiny_net().parameters(), lr=0.1),
            dice(),
            TCSMConfig(enabled=True),
            plane_axis=3,
        )


def test_basic_unet_2_5d_runs():
    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, features=(4, 4, 8, 8, 16, 4))
    labelled = [{"image": torch.randn(2, 3, 16, 32), "label": torch.randint(0, 2, (2, 1, 16, 32))}]
    trainer = make_trainer(net, labelled, [{"image": torch.randn(2, 3, 16, 32)}], ema_warmup_iterations=2)
    outputs = record_outputs(trainer)
    trainer.run()
    assert torch.isfinite(outputs[0]["loss"])


def _run_pair(tmp_path, epochs_first: int) -> tuple[TCSMTrainer, TCSMTrainer]:
    labelled = batches(2, 2, (16, 16))
    unlabelled = batches(2, 2, (16, 16), False, seed=3)
    tcsm = {"rampup_iterations": 10, "ema_warmup_iterations": 3, "ema_decay": 0.8, "scale": 0.1}
    full = make_trainer(tiny_net(seed=7), labelled, unlabelled, epochs=2, opt="adam", **tcsm)
    full.run()
    first = make_trainer(tiny_net(seed=7), labelled, unlabelled, epochs=epochs_first, opt="adam", **tcsm)
    first.run()
    path = save_checkpoint(first.state_dict(), tmp_path / "trainer.pt")
    resumed = make_trainer(tiny_net(seed=99), labelled, unlabelled, epochs=2, opt="adam", **tcsm)
    resumed.load_state_dict(load_checkpoint(path))  # weights_only=True load
    assert resumed.state.iteration == first.state.iteration == 2
    for a, b in zip(resumed.teacher.state_dict().values(), first.teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(resumed.student.state_dict().values(), first.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    resumed.run()
    return full, resumed


def _assert_same_networks(full, resumed) -> None:
    for name in ("student", "teacher"):
        for a, b in zip(
            getattr(full, name).state_dict().values(),
            getattr(resumed, name).state_dict().values(),
            strict=True,
        ):
            assert torch.equal(a, b), name


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    full, resumed = _run_pair(tmp_path, epochs_first=1)
    assert resumed.state.iteration == full.state.iteration == 4
    _assert_same_networks(full, resumed)


def test_each_rank_draws_its_own_transformations_after_a_resume(monkeypatch):
    from fewlabel.engines import tcsm as tcsm_module

    saved = make_trainer()
    saved.run()
    state = saved.state_dict()  # rank 0's checkpoint: its generator only
    draws = {}
    for world, rank_index in ((1, 0), (2, 0), (2, 1)):
        monkeypatch.setattr(tcsm_module, "world_size", lambda w=world: w)
        monkeypatch.setattr(tcsm_module, "rank", lambda r=rank_index: r)
        trainer = make_trainer()
        trainer.load_state_dict(state)
        draws[world, rank_index] = torch.rand(8, generator=trainer._generator)
    one_process = torch.rand(8, generator=torch.Generator().set_state(state["transform_rng"]))
    assert torch.equal(draws[1, 0], one_process)  # one process continues exactly
    assert not torch.equal(draws[2, 0], draws[2, 1])  # two ranks do not repeat each other


def test_load_state_dict_rejects_foreign_dicts():
    trainer = make_trainer()
    with pytest.raises(CheckpointError, match="lacks"):
        trainer.load_state_dict({"student": {}})
    state = trainer.state_dict()
    state["student"] = tiny_net(classes=3).state_dict()
    with pytest.raises(CheckpointError):
        trainer.load_state_dict(state)


class _RecordingImages(torch.utils.data.Dataset):
    """Unlabelled images indexed by ``ResumableSampler``'s ``(index, seed)`` pairs; records the indices."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.served: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, _ = item
        self.served.append(index)
        return {"image": self.images[index]}


def test_resume_continues_the_unlabelled_loader_where_it_stopped(tmp_path):
    # Three unlabelled batches against two labelled ones: the unlabelled passes run across
    # the epochs, so a resumed loader restarted from its first batch would feed other batches.
    labelled = batches(2, 2, (16, 16))
    unlabelled = batches(3, 2, (16, 16), False, seed=3)
    tcsm = {"rampup_iterations": 10, "ema_decay": 0.8}
    full = make_trainer(tiny_net(seed=7), labelled, unlabelled, epochs=3, opt="adam", **tcsm)
    full.run()
    resumed = None
    for epochs in (1, 2, 3):  # interrupted twice, at different unlabelled positions
        # Only the first segment starts from the uninterrupted run's weights; later ones load them.
        net = tiny_net(seed=7 if resumed is None else 99)
        trainer = make_trainer(net, labelled, unlabelled, epochs=epochs, opt="adam", **tcsm)
        if resumed is not None:
            path = save_checkpoint(resumed.state_dict(), tmp_path / "trainer.pt")
            trainer.load_state_dict(load_checkpoint(path))  # weights_only=True load
        trainer.run()
        resumed = trainer
        position = trainer.state_dict()["unlabeled_position"]
        assert type(position) is int and position == (2 * epochs - 1) % 3 + 1
    assert resumed is not None and resumed.state.iteration == full.state.iteration == 6
    _assert_same_networks(full, resumed)


def test_checkpoint_without_unlabelled_position_restarts_the_loader():
    unlabelled = batches(3, 2, (16, 24), False)
    served: list[int] = []

    saved = make_trainer(unlabelled=_Counting(unlabelled, served))
    saved.run()
    state = saved.state_dict()
    assert state.pop("unlabeled_position") == 2
    served.clear()
    old = make_trainer(unlabelled=_Counting(unlabelled, served), epochs=2)
    old.load_state_dict(state)  # as saved before the position was kept
    old.run()
    assert served == [0, 1]


def test_a_positioned_sampler_is_not_skipped_a_second_time():
    from fewlabel.data.sampling import ResumableSampler
    from fewlabel.engines.segmentation import _resume_sampler

    # As the segmentation pipeline builds it: one unlabelled batch per iteration, drawn by a
    # ResumableSampler that the pipeline positions after loading the trainer's state.
    def loader() -> torch.utils.data.DataLoader:
        images = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(4))
        sampler = ResumableSampler(5, seed=11, num_samples=2 * 2)
        return torch.utils.data.DataLoader(_RecordingImages(images), batch_size=2, sampler=sampler)

    full_loader = loader()
    make_trainer(unlabelled=full_loader, epochs=3).run()
    first = make_trainer(unlabelled=loader(), epochs=3)
    first.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: e.terminate())
    first.run()  # stopped part-way through the second epoch
    state = first.state_dict()
    assert state["engine"]["iteration"] == 3 and state["unlabeled_position"] == 1
    resumed_loader = loader()
    resumed = make_trainer(unlabelled=resumed_loader, epochs=3)
    resumed.load_state_dict(state)
    _resume_sampler(resumed_loader, 3, 2)
    resumed.run()
    assert resumed_loader.dataset.served == full_loader.dataset.served[3 * 2 :]
