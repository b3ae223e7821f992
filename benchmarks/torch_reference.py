"""The NumPy model's architecture in PyTorch, for the speed comparison only.

Imported by ``speed.py`` to time PyTorch in the benchmark's own process, and run
as a script to time it in a fresh process: one that never prepares a NumPy
training run, so PyTorch runs with the C library's default memory allocator
settings, as a PyTorch user gets them (``speed.py`` calls
``fast_layers.prepare_process_for_training()``, which changes them for the
whole process; see ``keep_freed_memory_for_reuse``).

Usage (prints one JSON line with training and evaluation images/s):
    python benchmarks/torch_reference.py --layout rows --cell rnn --batch 256 --steps 8 --threads 2
"""
import argparse
import json
import time

import numpy as np


def timed(fn, repeats, warmup):
    """Wall times (s) of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls (the
    benchmarks' one timing loop: speed.py through median_time, deep_step.py)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn, steps, warmup=2):
    """Median wall time of ``fn()`` over ``steps`` calls after ``warmup`` calls, in seconds."""
    return float(np.median(timed(fn, steps, warmup)))


def torch_model(layout, cell='rnn', hidden=128):
    from torch import nn

    class TorchCNNRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            D = 64 if layout == 'pixels' else 512
            if cell == 'rnn':
                self.rnn = nn.RNN(D, hidden, nonlinearity='tanh', batch_first=True)
            else:
                self.rnn = {'gru': nn.GRU, 'lstm': nn.LSTM}[cell](D, hidden, batch_first=True)
            self.head = nn.Linear(hidden, 10)

        def forward(self, x):
            f = self.conv(x).permute(0, 2, 3, 1)           # (N, 8, 8, 64), as the NumPy model
            n = f.shape[0]
            seq = f.reshape(n, 64, 64) if layout == 'pixels' else f.reshape(n, 8, 512)
            _, h = self.rnn(seq)
            if cell == 'lstm':
                h = h[0]                                    # (h_n, c_n)
            return self.head(h[-1])
    return TorchCNNRNN()


def torch_step_fn(layout, batch, threads, seed=0, cell='rnn'):
    """(step, evaluate): one SGD training step on a fixed batch, and forward passes in batches of 500."""
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = torch_model(layout, cell)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    X = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(X), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    def evaluate(Xe):
        with torch.no_grad():
            for s in range(0, len(Xe), 500):
                torch.softmax(model(Xe[s:s + 500]), dim=1)
    return step, evaluate


def measure(layout, cell, batch, steps, threads, eval_images):
    """Training and evaluation images/s of the PyTorch model, median over ``steps``."""
    import torch
    step, evaluate = torch_step_fn(layout, batch, threads, cell=cell)
    t_train = median_time(step, steps)
    Xe = torch.from_numpy(np.random.default_rng(1).random((eval_images, 3, 32, 32), dtype=np.float32))
    t_eval = median_time(lambda: evaluate(Xe), 3, warmup=1)
    return batch / t_train, eval_images / t_eval


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--layout', default='rows', choices=['pixels', 'rows'])
    ap.add_argument('--cell', default='rnn', choices=['rnn', 'gru', 'lstm'])
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--steps', type=int, default=8)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--eval-images', type=int, default=2000)
    args = ap.parse_args()
    train, evaluation = measure(args.layout, args.cell, args.batch, args.steps, args.threads, args.eval_images)
    print(json.dumps({'train_img_s': train, 'eval_img_s': evaluation}))


if __name__ == '__main__':
    main()
