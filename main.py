"""Training driver (work in progress): optimizer."""
import numpy as np


class SGD:
    """SGD with (optionally Nesterov) momentum, updating parameters in place.

    v <- momentum * v - lr * g;  p <- p + v   (Nesterov: p <- p + momentum * v - lr * g)
    """

    def __init__(self, params, momentum=0.9, nesterov=False):
        self.params = params
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.velocity = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads, lr):
        for name, p in self.params.items():
            g = grads[name]
            v = self.velocity[name]
            v *= self.momentum
            v -= lr * g
            if self.nesterov:
                p += self.momentum * v - lr * g
            else:
                p += v
