"""Resuming never holds the whole checkpoint in a process's own memory (issue 18, defect 6):
every process of a node resumes at once, 8 x ~12 GB for a full SD 1.5 fine-tune with its
text encoder, and a node that cannot hold that OOM-kills the resume forever."""

from __future__ import annotations

import threading

import torch

from dreambooth.trainer import state

TENSORS, ELEMENTS = 24, 1 << 20  # 24 x 4 MiB of weights, twice that of AdamW moments


def anon_bytes() -> int:
    """This process's own (anonymous) resident memory; page-cache pages of a memory-mapped
    file, which the processes of a node share and the kernel can drop, do not count."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakAnon:
    def __enter__(self):
        self.peak, self._done = anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, anon_bytes())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, anon_bytes())


def training_state(step: bool):
    unet = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(ELEMENTS)) for _ in range(TENSORS))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, foreach=False)
    if step:
        for p in unet.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return {"unet": unet}, optimizer, schedule


def test_resume_reads_the_checkpoint_without_copying_it_into_memory(tmp_path):
    modules, optimizer, schedule = training_state(step=True)
    state.write(tmp_path, step=1, modules=modules, optimizer=optimizer, lr_scheduler=schedule, facts={})
    written = sum(p.stat().st_size for p in tmp_path.iterdir())
    saved = [p.detach().clone() for p in modules["unet"].parameters()]
    del modules, optimizer, schedule

    modules, optimizer, schedule = training_state(step=False)  # a new pod, before resuming
    with PeakAnon() as resume:
        before = anon_bytes()
        assert state.read(tmp_path, modules=modules, optimizer=optimizer, lr_scheduler=schedule, facts={}) == 1
    grown = resume.peak - before
    assert written > 250 * 2**20, written
    assert grown < 0.1 * written, (
        f"resuming took {grown / 2**20:.0f} MiB of own memory for a {written / 2**20:.0f} MiB checkpoint"
    )
    assert all(torch.equal(a, b) for a, b in zip(saved, modules["unet"].parameters(), strict=True))
    assert len(optimizer.state) == TENSORS
