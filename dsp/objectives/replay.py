"""An experience replay buffer of training tuples for value regression (DVN §3.2: "very much like
Q-learning, this training set evolves over time, and one can make use of an experience replay
buffer"; the paper also trains on inference results of "slightly older" weights from a queue).

A ring of the last `size` tuples (x, ȳ, y): the input, the generated output and the ground truth.
v*(ȳ, y) is recomputed when a tuple is replayed (the oracle is cheap and exact), so the buffer does
not depend on the oracle. Storage is allocated on the first push, on that batch's device, and
saved with the run's checkpoints (state_dict), so a resumed run replays the same tuples. Under
trainer.strategy=ddp every rank keeps its own ring and the checkpoint holds every rank's (the
trainer gathers them: the value objective declares per_rank_state), so each rank resumes its own.
"""
from __future__ import annotations

import torch


class ReplayBuffer:
    def __init__(self, size: int):
        self.size = int(size)
        self.x = self.y_bar = self.y = None  # [size, ...] each, allocated on the first push
        self.count = 0  # tuples held (<= size)
        self.next = 0  # ring position the next tuple is written to

    def __len__(self) -> int:
        return self.count

    def push(self, x: torch.Tensor, y_bar: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch of tuples [n, ...], overwriting the oldest once full."""
        x, y_bar, y = (t.detach()[-self.size :] for t in (x, y_bar, y))  # more than fits: the newest
        if self.x is None:
            self.x, self.y_bar, self.y = (t.new_zeros(self.size, *t.shape[1:]) for t in (x, y_bar, y))
        pos = (self.next + torch.arange(x.shape[0], device=self.x.device)) % self.size  # [n], distinct
        self.x[pos], self.y_bar[pos], self.y[pos] = x, y_bar.to(self.y_bar.dtype), y.to(self.y.dtype)
        self.next = (self.next + x.shape[0]) % self.size
        self.count = min(self.size, self.count + x.shape[0])

    def sample(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k tuples drawn uniformly with replacement -> (x, ȳ, y), each [k, ...]."""
        idx = torch.randint(self.count, (k,)).to(self.x.device)
        return self.x[idx], self.y_bar[idx], self.y[idx]

    def state_dict(self) -> dict:
        if self.x is None:
            return {}
        held = slice(0, self.count)  # only the filled part: a young buffer checkpoints small
        return {"x": self.x[held], "y_bar": self.y_bar[held], "y": self.y[held], "next": self.next,
                "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        x, y_bar, y = state["x"], state["y_bar"], state["y"]
        self.x, self.y_bar, self.y = (t.new_zeros(self.size, *t.shape[1:]) for t in (x, y_bar, y))
        keep = min(self.size, x.shape[0])
        self.x[:keep], self.y_bar[:keep], self.y[:keep] = x[:keep], y_bar[:keep], y[:keep]
        self.count = keep
        # the same size (a resumed run): exactly as saved; another size: the oldest `keep` tuples
        self.next = int(state["next"]) if state.get("size") == self.size else keep % self.size
