"""The value objective's experience replay buffer (DVN §3.2): a ring of the newest tuples, replayed
beside the fresh ones, saved and restored with the run's checkpoints."""
from __future__ import annotations

import pytest
import torch

from dsp.errors import DspError
from dsp.objectives.replay import ReplayBuffer
from dsp.objectives.value import ValueObjective
from test_dvn_seg import ascent, tiny_dvn


def tuples(start: int, n: int):
    """n tuples whose values tell their number: x = y_bar = y = start + i."""
    ids = torch.arange(start, start + n, dtype=torch.float32)
    return ids[:, None].expand(n, 3).clone(), ids[:, None].expand(n, 2).clone(), ids[:, None].expand(n, 2).clone()


def test_the_ring_keeps_the_newest_tuples():
    ring = ReplayBuffer(5)
    ring.push(*tuples(0, 3))
    assert len(ring) == 3
    ring.push(*tuples(3, 4))  # 0..6 pushed: 2..6 kept, 5 and 6 over the oldest two
    assert len(ring) == 5 and sorted(ring.x[:, 0].tolist()) == [2, 3, 4, 5, 6]
    ring.push(*tuples(7, 9))  # more than fits at once: the newest five
    assert sorted(ring.x[:, 0].tolist()) == [11, 12, 13, 14, 15]
    x, y_bar, y = ring.sample(64)
    assert x.shape == (64, 3) and y_bar.shape == y.shape == (64, 2)
    assert set(x[:, 0].tolist()) <= {11, 12, 13, 14, 15} and torch.equal(x[:, :2], y_bar)


def test_a_restored_ring_samples_and_fills_as_the_saved_one():
    ring = ReplayBuffer(6)
    ring.push(*tuples(0, 4))
    copy = ReplayBuffer(6)
    copy.load_state_dict(ring.state_dict())
    for r in (ring, copy):
        r.push(*tuples(4, 5))
    torch.manual_seed(0)
    a = ring.sample(10)
    torch.manual_seed(0)
    b = copy.sample(10)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and torch.equal(ring.x, copy.x)
    assert ReplayBuffer(3).state_dict() == {}


def test_replayed_tuples_join_the_regression_from_the_second_step():
    model = tiny_dvn()
    x, y = torch.rand(4, 3, 8, 8), (torch.rand(4, 8, 8) < 0.4).float()
    obj = ValueObjective(oracle="iou", replay_size=10, replay_batch=6)
    _, logs = obj.loss(model, ascent(max_iter=2), x, y)
    assert "v_star/replay" not in logs and len(obj.replay) == 4  # nothing to replay yet
    seen = []
    model.score = (lambda score: lambda y_bar, feats: seen.append(y_bar.shape[0]) or score(y_bar, feats))(model.score)
    loss, logs = obj.loss(model, ascent(max_iter=2), x, y)
    assert seen[-1] == 4 + 6 and "v_star/replay" in logs and len(obj.replay) == 8
    loss.backward()  # the replayed tuples' features carry gradients too
    assert all(p.grad is not None for p in model.parameters())
    restored = ValueObjective(oracle="iou", replay_size=10, replay_batch=6)
    restored.load_state_dict(obj.state_dict())
    assert torch.equal(restored.replay.y_bar, obj.replay.y_bar) and len(restored.replay) == 8


@pytest.mark.parametrize("size, batch", [(0, 4), (10, 0), (-1, 0)])
def test_replay_settings_come_in_pairs(size, batch):
    with pytest.raises(DspError, match="replay_size"):
        ValueObjective(replay_size=size, replay_batch=batch)
