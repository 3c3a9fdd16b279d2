"""An exponential moving average of the LoRA weights, kept in fp32 beside the trained ones.

Updated after every optimizer step with diffusers' default warm-up, ``min(decay, (1 + t) / (10 + t))`` at update t,
so a short LoRA run is not dominated by its random start. Its state is plain tensors keyed by parameter name, so a
checkpoint holds it in safetensors and a resume continues it exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class LoraEMA:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        self.shadow = [param.detach().clone().float() for param in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().float(), weight)
        self.updates += 1

    @contextmanager
    def swapped_in(self):
        """The EMA weights in place of the trained ones (for validation or saving); the trained ones afterwards."""
        saved = [param.detach().clone() for param in self.params]
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.params):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for value, param in zip(saved, self.params):
                    param.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {name: shadow.detach().to("cpu").contiguous() for name, shadow in zip(self.names, self.shadow)}
        state["__updates__"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def shapes(self) -> dict[str, tuple]:
        return {**{name: tuple(s.shape) for name, s in zip(self.names, self.shadow)}, "__updates__": ()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(state[name].to(shadow.device, shadow.dtype))
        self.updates = int(state["__updates__"])
