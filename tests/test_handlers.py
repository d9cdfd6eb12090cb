"""Training and shared handlers (medfcn.training.handlers, medfcn.training.monitoring, medfcn.handlers):
per-class metrics, overlays, epoch filter of validation, weight averaging, checkpoints, progress."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace
from unittest.mock import create_autospec

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.engines import Evaluator
from monai.utils import CommonKeys
from rich.console import Console

from medfcn.handlers import PerClassMetrics
from medfcn.training.handlers import CheckpointWriter, ValidateEvery, WeightAverage
from medfcn.training.monitoring import EpochProgress, overlay_slice


def test_overlay_colours_only_labelled_pixels():
    image = np.linspace(0, 1, 20).reshape(4, 5)
    labels = np.zeros((4, 5), dtype=int)
    labels[1, 2] = 1
    rgb = overlay_slice(image, labels)
    assert rgb.shape == (3, 4, 5) and rgb.dtype == np.uint8
    plain = overlay_slice(image, np.zeros_like(labels))
    assert np.array_equal(rgb[:, 0], plain[:, 0])
    assert not np.array_equal(rgb[:, 1, 2], plain[:, 1, 2])
    assert np.all(plain[0] == plain[1])  # grey where nothing is labelled


def test_per_class_metrics_ignore_nan_cases():
    engine = Engine(lambda e, b: None)
    engine.state.metric_details = {"dice": torch.tensor([[0.8, float("nan")], [0.6, 0.5]])}
    engine.state.metrics = {}
    PerClassMetrics("dice", ["a", "b"])(engine)
    assert engine.state.metrics == pytest.approx({"val_dice_a": 0.7, "val_dice_b": 0.5})
    with pytest.raises(ValueError, match="classes"):
        PerClassMetrics("dice", ["a", "b", "c"])(engine)


def test_validate_every_also_runs_after_last_epoch():
    validator = create_autospec(Evaluator, instance=True)
    trainer = Engine(lambda e, b: None)
    ValidateEvery(validator=validator, interval=3, epoch_level=True).attach(trainer)
    trainer.run([0, 1], max_epochs=7)
    assert [c.args[0] for c in validator.run.call_args_list] == [3, 6, 7]


def _linear(value: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(layer.weight, value)
    torch.nn.init.constant_(layer.bias, value)
    return layer


def test_weight_average_warms_up_then_smooths():
    source = _linear(0.0)
    ema = WeightAverage(source, decay=0.9)
    assert ema.network is not source and not any(p.requires_grad for p in ema.network.parameters())
    trainer = Engine(lambda e, b: torch.nn.init.constant_(source.weight, float(b)))
    ema.attach(trainer)
    trainer.run([1.0, 1.0, 1.0, 1.0], max_epochs=1)
    # decays min(0.9, (1 + n) / (10 + n)) for n = 0..3: 0.1, 2/11, 3/12, 4/13
    expected = 0.0
    for n in range(4):
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * 1.0
    assert ema.updates == 4
    torch.testing.assert_close(ema.network.weight, torch.full((1, 2), expected))
    torch.testing.assert_close(ema.network.bias, torch.zeros(1))  # the bias never moved
    assert 0.99 < expected < 1.0  # close to, but not yet at, the source: it can fail both ways
    for _ in range(300):
        ema()
    assert ema.current_decay() == 0.9


def test_weight_average_state_round_trip_and_disabled():
    source = _linear(1.0)
    ema = WeightAverage(source, decay=0.99)
    torch.nn.init.constant_(source.weight, 3.0)
    ema()
    restored = WeightAverage(_linear(1.0), decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1
    torch.testing.assert_close(restored.network.weight, ema.network.weight)
    assert not torch.equal(restored.network.weight, source.weight)

    off = WeightAverage(source, decay=None)
    assert off.network is source and off.state_dict() == {}
    trainer = Engine(lambda e, b: None)
    off.attach(trainer)
    assert not trainer.has_event_handler(off)
    with pytest.raises(ValueError, match="no weight average"):
        ema.load_state_dict({})
    off.load_state_dict({})  # a run without averaging resumes its own checkpoint
    with pytest.raises(ValueError, match="holds a weight average"):  # never a silent drop
        off.load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(source, decay=1.0)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_best_model_holds_cpu_tensors_whatever_the_training_device(tmp_path, device):
    """best_model.pt is the file users copy into a bundle: a plain torch.load must read it on a
    machine without a GPU, and load_state_dict must take it as the network's own state dict."""

    def network():
        return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))

    net = network().to(device)
    writer = CheckpointWriter(str(tmp_path), {"network": net})
    writer.save_best(SimpleNamespace(state=SimpleNamespace(best_metric_epoch=3, epoch=3)))
    weights = torch.load(tmp_path / "best_model.pt", weights_only=True)
    state = net.state_dict()
    assert list(weights) == list(state) and all(t.device.type == "cpu" for t in weights.values())
    assert all(torch.equal(weights[k], v.cpu()) for k, v in state.items())
    assert weights._metadata == state._metadata  # layer versions, which load_state_dict reads
    network().load_state_dict(weights)

    (tmp_path / "best_model.pt").unlink()
    writer.save_best(SimpleNamespace(state=SimpleNamespace(best_metric_epoch=3, epoch=4)))  # not the best epoch
    assert not (tmp_path / "best_model.pt").exists()


def _progress_run(console) -> list[str]:
    """Two epochs of three iterations with losses 0.1..0.6 through EpochProgress; its lines."""
    lines: list[str] = []
    losses = iter([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    trainer = Engine(lambda e, b: {CommonKeys.LOSS: torch.tensor(next(losses))})
    EpochProgress(print_fn=lambda text, **kw: lines.append(text), console=console).attach(trainer)
    trainer.run([0, 1, 2], max_epochs=2)
    return lines


def test_epoch_progress_bar_on_a_terminal_only():
    """On a terminal a bar inside each epoch counts the iterations with the latest loss and the
    time left; in a log (no terminal) nothing but the per-epoch lines is written."""
    screen = io.StringIO()
    lines = _progress_run(Console(file=screen, force_terminal=True, width=120))
    assert [line.split("  ")[:2] for line in lines] == [["epoch 1/2", "loss 0.2000"], ["epoch 2/2", "loss 0.5000"]]
    drawn = screen.getvalue()
    for fragment in ("epoch 1/2", "1/3", "3/3", "loss 0.3000", "epoch 2/2", "loss 0.6000", "ETA"):
        assert fragment in drawn, (fragment, drawn)
    log = io.StringIO()
    plain = _progress_run(Console(file=log, force_terminal=False))
    assert [line.split("  ")[:2] for line in plain] == [line.split("  ")[:2] for line in lines]
    assert log.getvalue() == ""


@pytest.mark.parametrize(("budget", "over"), [(10.0, False), (1e-5, True)])
def test_epoch_progress_says_where_the_run_ends_against_its_budget(budget, over):
    """A planned bundle's budget: each line says at which minute of it the run will end, and a
    run heading past it by more than 10 % is told so once."""
    lines: list[str] = []

    def step(engine, batch):
        time.sleep(0.01)  # 20 ms a run: 30x a budget of 1e-5 min
        return {CommonKeys.LOSS: torch.tensor(0.5)}

    trainer = Engine(step)
    progress = EpochProgress(print_fn=lambda text, **kw: lines.append(text), budget_minutes=budget)
    progress.attach(trainer)
    trainer.run([0, 1], max_epochs=3)
    assert all(f"of the {budget:g}-min budget)" in line for line in lines), lines
    assert sum("over the budget by more than 10 %" in line for line in lines) == (1 if over else 0), lines


def test_epoch_progress_without_a_budget_says_nothing_of_one():
    lines = _progress_run(Console(file=io.StringIO(), force_terminal=False))
    assert not any("budget" in line for line in lines)


class _Clock:
    """A fake monotonic clock: each training iteration advances it by the step time of its epoch."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _kept_run(step_s, planned=20, iterations=10, budget_s=200.0, start_epoch=0, scheduler_cls=None, saved=None):
    """Train ``planned`` epochs of ``iterations`` fake steps, each taking ``step_s(epoch)``
    seconds on a fake clock, with a BudgetKeeper for ``budget_s``; the engine, keeper, the
    scheduler, the lines printed and the seconds spent."""
    from monai.handlers import LrScheduleHandler

    from medfcn.training.handlers import BudgetKeeper

    clock, lines = _Clock(), []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = (scheduler_cls or torch.optim.lr_scheduler.PolynomialLR)(optimizer, planned)

    def step(engine, batch):
        optimizer.step()
        clock.now += step_s(engine.state.epoch)

    trainer = Engine(step)
    keeper = BudgetKeeper(budget_s / 60, scheduler, print_fn=lambda text, **kw: lines.append(text), clock=clock)
    if saved is not None:  # last.pt's record of the keeper, as Resume loads it
        keeper.load_state_dict(saved)
    keeper.attach(trainer)
    LrScheduleHandler(scheduler, print_lr=False).attach(trainer)
    if start_epoch:  # a resumed run: the trainer's state as Resume restores it
        trainer.load_state_dict({"epoch": start_epoch, "max_epochs": planned, "epoch_length": iterations})
        scheduler.last_epoch = start_epoch
    trainer.run(range(iterations), max_epochs=planned)
    return trainer, keeper, scheduler, lines, clock.now


def test_budget_keeper_leaves_a_run_on_plan_alone():
    trainer, _, scheduler, lines, spent = _kept_run(lambda epoch: 1.0)  # 20 epochs of 10 s: the budget
    assert trainer.state.epoch == 20 and scheduler.total_iters == 20 and not lines
    assert spent == pytest.approx(200.0)


def test_budget_keeper_ends_a_slow_run_within_its_budget_with_the_schedule_decayed():
    trainer, _, scheduler, lines, spent = _kept_run(lambda epoch: 1.5)  # 15 s epochs: 13 fit in 200 s
    assert trainer.state.epoch == 13 and trainer.state.max_epochs == 13, lines
    assert spent <= 200.0
    assert scheduler.total_iters == 13
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to its end
    assert len(lines) == 1 and "training ends after epoch 13 instead of 20" in lines[0], lines


def test_budget_keeper_gives_epochs_back_when_the_machine_speeds_up_but_never_past_the_plan():
    slow_then_fast = lambda epoch: 2.0 if epoch <= 5 else 0.5  # noqa: E731
    trainer, _, scheduler, lines, spent = _kept_run(slow_then_fast)
    assert len(lines) == 1 and "ends after epoch 10 instead of 20" in lines[0], lines  # said once
    assert trainer.state.epoch == scheduler.total_iters <= 20
    assert trainer.state.epoch > 10  # more than the slow start's projection (200 s / 20 s)
    assert spent <= 200.0 * 1.03
    fast = _kept_run(lambda epoch: 0.5)  # 5 s epochs: half the budget, the planned epochs only
    assert fast[0].state.epoch == 20 and not fast[3]


def test_budget_keeper_resumed_goes_on_counting_and_keeps_the_length_it_set():
    uninterrupted = _kept_run(lambda epoch: 1.5)
    assert uninterrupted[0].state.epoch == 13 and uninterrupted[1].state_dict()["last_epoch"] == 13
    saved = uninterrupted[1].state_dict()
    assert saved["budget_minutes"] == pytest.approx(200 / 60) and saved["planned"] == 20
    saved = {**saved, "seconds": 150.0}  # as if interrupted after epoch 10 of 15 s
    trainer, keeper, scheduler, lines, spent = _kept_run(lambda epoch: 1.5, start_epoch=10, saved=saved)
    assert trainer.state.epoch == 13 and scheduler.total_iters == 13
    assert not lines  # the length set before, taken back: not decided again
    assert keeper.spent() == pytest.approx(150.0 + spent) and keeper.spent() <= 200.0
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    other_plan = _kept_run(lambda epoch: 1.0, start_epoch=10, saved={**saved, "seconds": 100.0, "planned": 30})
    assert other_plan[0].state.epoch == 20  # a length set for another plan is not taken


def test_restart_schedule_gives_an_extended_run_its_rate_back():
    from medfcn.training.handlers import restart_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    poly = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=4, power=0.9)
    for _ in range(4):
        optimizer.step()
        poly.step()
    assert optimizer.param_groups[0]["lr"] == 0.0  # the run's end: a recursive step stays at 0
    restart_schedule(poly, 8)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * 0.5**0.9) == poly.get_last_lr()[0]
    optimizer.step()
    poly.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * (3 / 8) ** 0.9)  # and follows the 8 epochs
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4, eta_min=0.1)
    cosine.last_epoch = 4
    restart_schedule(cosine, 8)
    assert cosine.T_max == 8 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 + (2.0 - 0.1) / 2)


def test_budget_keeper_gives_a_resumed_run_the_planned_share_of_the_budget():
    """A last.pt of an older medfcn has no record of the keeper: the planned share of the budget."""
    trainer, keeper, _, lines, spent = _kept_run(lambda epoch: 1.5, start_epoch=10)
    assert keeper.budget_s == pytest.approx(100.0)  # 10 of 20 epochs left
    assert trainer.state.epoch == 16 and spent <= 100.0, lines  # 6 epochs of 15 s fit in 100 s


def test_budget_keeper_needs_a_schedule_with_a_horizon():
    from medfcn.training.handlers import BudgetKeeper

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, 5)
    with pytest.raises(ValueError, match="budget_minutes: the lr_scheduler StepLR cannot be given a new length"):
        BudgetKeeper(20.0, step_lr)
    BudgetKeeper(None, step_lr).attach(Engine(lambda e, b: None))  # no budget, nothing to keep
    cosine = _kept_run(lambda epoch: 1.5, scheduler_cls=torch.optim.lr_scheduler.CosineAnnealingLR)
    assert cosine[0].state.epoch == 13 and cosine[2].T_max == 13
    assert cosine[2].optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def _resumed_schedule(saved_horizon: int, epochs_done: int, configured: int, rate: float):
    """Resume a PolynomialLR of ``configured`` epochs from a checkpoint whose schedule had
    ``saved_horizon`` epochs, ``epochs_done`` of them done, at ``rate``; the scheduler."""
    from medfcn.training.handlers import Resume

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=configured, power=1.0)
    saved_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    saved = torch.optim.lr_scheduler.PolynomialLR(saved_opt, total_iters=saved_horizon, power=1.0)
    saved.last_epoch = epochs_done
    saved_opt.param_groups[0]["lr"] = rate
    trainer = Engine(lambda e, b: None)
    trainer.state.max_epochs = configured
    checkpoint = {
        "optimizer": saved_opt.state_dict(),
        "lr_scheduler": saved.state_dict(),
        "trainer": {"epoch_length": 1, "iteration": epochs_done, "max_epochs": saved_horizon},
    }
    resume = Resume(load_path="unused.pt", load_dict={"optimizer": optimizer, "lr_scheduler": scheduler})
    resume.attach(trainer)
    resume.checkpoint = checkpoint
    resume(trainer)
    assert trainer.state.epoch == epochs_done and trainer.state.max_epochs == configured
    return scheduler


def test_resume_keeps_the_rate_mid_schedule_and_restarts_an_ended_one():
    mid = _resumed_schedule(saved_horizon=13, epochs_done=10, configured=20, rate=0.23)  # a kept run, stopped
    assert mid.total_iters == 20 and mid.optimizer.param_groups[0]["lr"] == pytest.approx(0.23)
    ended = _resumed_schedule(saved_horizon=13, epochs_done=13, configured=20, rate=0.0)  # extended by --epochs
    assert ended.total_iters == 20 and ended.optimizer.param_groups[0]["lr"] == pytest.approx(1 - 13 / 20)
    same = _resumed_schedule(saved_horizon=20, epochs_done=7, configured=20, rate=0.65)  # an ordinary resume
    assert same.optimizer.param_groups[0]["lr"] == pytest.approx(0.65)


def test_resume_restores_a_schedule_whose_length_is_not_the_runs():
    """A LinearLR warm-up's ``total_iters`` counts its own steps, not the run's epochs: a resume
    takes the checkpoint's, where a PolynomialLR keeps the configured run length."""
    from medfcn.training.handlers import Resume

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=9)
    saved_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    saved = torch.optim.lr_scheduler.LinearLR(saved_opt, start_factor=0.1, total_iters=5)
    trainer = Engine(lambda e, b: None)
    trainer.state.max_epochs = 20
    checkpoint = {
        "optimizer": saved_opt.state_dict(),
        "lr_scheduler": saved.state_dict(),
        "trainer": {"epoch_length": 1, "iteration": 3, "max_epochs": 20},
    }
    resume = Resume(load_path="unused.pt", load_dict={"optimizer": optimizer, "lr_scheduler": warmup})
    resume.attach(trainer)
    resume.checkpoint = checkpoint
    resume(trainer)
    assert warmup.total_iters == 5
