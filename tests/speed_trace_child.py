"""Child of test_port_speed_trace.py: does a cold abstract trace of a twin compile anything?

Prints {"compiled": [names of XLA compilations during abstract_target]} as its last line. In a
fresh process every compilation is real work the user waits for (the first jax.random.key alone
costs ~0.1 s), and an abstract trace needs none.
"""
from __future__ import annotations

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from weight_port.flax_tree import abstract_target


class Twin(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dropout(0.1, deterministic=not train)(nn.Dense(4, name="fc")(x))
        return nn.Dense(2, name="head")(x)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling"):
            self.names.append(message.split(" with ")[0])


if __name__ == "__main__":
    jnp.zeros(1).block_until_ready()  # the backend itself is up before we start counting
    handler = Collect()
    logging.getLogger("jax").addHandler(handler)
    with jax.log_compiles(True):
        target = abstract_target(Twin(), (np.zeros((2, 3), np.float32),))
    assert ("params", "head", "kernel") in target.shapes
    print(json.dumps({"compiled": handler.names}))
