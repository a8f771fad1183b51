"""Schedule values at key points, worked out by hand from Composer's formulas."""

from __future__ import annotations

import io
import math

import pytest
import torch

from foundry.config.schema import SchedulerConfig
from foundry.train.schedulers import build_multiplier, build_scheduler


def _mult(name, total_steps=110, tokens_per_step=1000, **kwargs):
    return build_multiplier(SchedulerConfig(name=name, **kwargs), total_steps, tokens_per_step)


@pytest.mark.parametrize(
    "name", ["cosine_with_warmup", "linear_decay_with_warmup", "constant_with_warmup", "inv_sqrt_with_warmup"]
)
def test_linear_warmup_from_zero(name):
    f = _mult(name, t_warmup="10ba", alpha_f=0.1, t_scale="4ba")
    assert f(0) == 0.0  # the first step runs at lr 0, as in Composer
    assert f(3) == pytest.approx(0.3)
    assert f(10) == pytest.approx(1.0)  # warmup ends exactly at the peak


def test_cosine_with_warmup():
    f = _mult("cosine_with_warmup", t_warmup="10ba", alpha_f=0.1)  # decays over steps 10..110
    assert f(35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)  # 0.868198
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # held at alpha_f past t_max


def test_cosine_t_max_shorter_than_run_and_zero_warmup():
    f = _mult("cosine_with_warmup", t_warmup="0ba", alpha_f=0.0, t_max="50ba")
    assert f(0) == pytest.approx(1.0)
    assert f(25) == pytest.approx(0.5)
    assert f(50) == pytest.approx(0.0, abs=1e-12)
    assert f(100) == pytest.approx(0.0, abs=1e-12)


def test_linear_decay_with_warmup():
    f = _mult("linear_decay_with_warmup", t_warmup="10ba", alpha_f=0.1)
    assert f(35) == pytest.approx(0.775)  # 1 - 0.9 * 25/100
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1)
    assert f(200) == pytest.approx(0.1)


def test_constant_with_warmup_ignores_alpha_f():
    f = _mult("constant_with_warmup", t_warmup="10ba", alpha_f=0.1)
    assert f(5) == pytest.approx(0.5)
    assert f(10) == f(60) == f(1000) == 1.0


def test_inv_sqrt_with_warmup():
    f = _mult("inv_sqrt_with_warmup", t_warmup="10ba", alpha_f=0.1, t_scale="4ba")
    assert f(22) == pytest.approx(0.55)  # (22 - 10 + 4) / 4 = 4: 0.1 + 0.9 / 2
    assert f(42) == pytest.approx(0.4)  # (42 - 10 + 4) / 4 = 9: 0.1 + 0.9 / 3
    assert f(10_000) == pytest.approx(0.1 + 0.9 / math.sqrt(9994 / 4))  # no t_max: keeps decaying


def test_token_durations_round_up_to_whole_steps():
    f = _mult(
        "linear_decay_with_warmup",
        total_steps=1000,
        tokens_per_step=300,
        t_warmup="1000tok",
        t_max="30Ktok",
        alpha_f=0.0,
    )
    assert f.t_warmup == 4 and f.t_max == 100  # ceil(1000 / 300), 30000 / 300
    assert f(2) == pytest.approx(0.5)
    assert f(52) == pytest.approx(0.5)  # (52 - 4) / (100 - 4) of the way to 0


def test_scheduler_drives_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_scheduler(
        opt, SchedulerConfig(name="linear_decay_with_warmup", t_warmup="2ba", alpha_f=0.0), 6, 1
    )
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warmup 0, 1/2; then 1 -> 0 over steps 2..6
    assert seen == pytest.approx([0.0, 1.0, 2.0, 1.5, 1.0, 0.5, 0.0])


def test_state_dict_round_trip_restores_position_and_schedule():
    def make(total_steps):
        param = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([param], lr=1.0)
        cfg = SchedulerConfig(name="cosine_with_warmup", t_warmup="3ba", alpha_f=0.2)
        return opt, build_scheduler(opt, cfg, total_steps, 1)

    opt, sched = make(total_steps=20)
    for _ in range(8):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)  # primitives only: loads with weights_only
    buffer.seek(0)

    opt2, sched2 = make(total_steps=999)
    sched2.load_state_dict(torch.load(buffer, weights_only=True))
    assert sched2.last_epoch == 8 and sched2.lr_lambdas[0].t_max == 20
    opt.step(), sched.step()
    opt2.step(), sched2.step()
    want = 0.2 + 0.8 * (1 + math.cos(math.pi * 6 / 17)) / 2  # step 9: tau = (9 - 3) / (20 - 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(want)
    assert opt2.param_groups[0]["lr"] == pytest.approx(want)
