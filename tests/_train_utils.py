"""Shared helpers of the training/data/eval tests: tiny synthetic data sets and a CLI runner."""

from __future__ import annotations

import gzip
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The tiniest member of the small-image family: widths 8/16/32, 1 block per stage.
TINY = ["--model", "aff_cifar_resnet8", "--model-kwargs", "width_mult=0.125"]


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def fake_images(n: int, size: int, chans: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class k is a bright horizontal band at height ~k, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    images = rng.integers(0, 60, (n, chans, size, size))
    band = size // num_classes
    for i, k in enumerate(labels):
        images[i, :, k * band: k * band + max(band, 1), 4: size - 4] += 180
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_fashion_mnist(root: Path, n_train: int = 512, n_test: int = 256) -> Path:
    """A Fashion-MNIST look-alike (four gzipped idx files, 28x28 grey, 10 classes) in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_images(n, 28, 1, 10, seed)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[:, 0])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def write_cifar(root: Path, kind: str, n_train: int = 64, n_test: int = 32) -> Path:
    """Tiny CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``) pickles in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    files = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if kind == "cifar10" else (["train"], ["test"])
    for names, n, seed in ((files[0], n_train, 0), (files[1], n_test, 1)):
        for j, name in enumerate(names):
            images, fine = fake_images(n // len(names), 32, 3, 100 if kind == "cifar100" else 10, seed + j)
            batch = {b"data": images.reshape(len(images), -1)}
            if kind == "cifar10":
                batch[b"labels"] = fine.tolist()
            else:
                batch[b"fine_labels"] = fine.tolist()
                batch[b"coarse_labels"] = (fine // 5).tolist()
            (root / name).write_bytes(pickle.dumps(batch))
    if kind == "cifar100":
        (root / "meta").write_bytes(pickle.dumps({}))
    return root


def write_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40,
                       splits: tuple[str, ...] = ("train", "val")) -> Path:
    """An ImageNet-style folder: ``root/{train,val}/class_k/*.png`` of RGB images."""
    for split in splits:
        images, _ = fake_images(classes * per_class, size, 3, classes, seed=len(split))
        for i, img in enumerate(images):
            d = root / split / f"class_{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"img_{i}.png")
    return root


def env() -> dict[str, str]:
    """The environment of a child process: our sources first on the path, one thread per process."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def openaff(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m openaff ARGS`` in a fresh process and capture its output."""
    return subprocess.run([sys.executable, "-m", "openaff", *args], capture_output=True, text=True, env=env(),
                          timeout=timeout, cwd=ROOT)


def wait_for_step(proc: subprocess.Popen, checkpoint: Path, step: int, timeout: float = 240) -> None:
    """Return once ``checkpoint`` (a run's last.pt, rewritten atomically) records ``global_step >= step``, or the
    process has ended, or ``timeout`` seconds have passed.

    The file is read only when a new one has replaced it (a changed inode or mtime), so the parent stays
    idle while its child trains instead of unpickling the same checkpoint every few milliseconds.
    """
    from openaff.training.checkpoint import load_checkpoint

    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            st = os.stat(checkpoint)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_ino, st.st_mtime_ns) != seen:
            seen = (st.st_ino, st.st_mtime_ns)
            try:
                if load_checkpoint(checkpoint)["global_step"] >= step:
                    return
            except Exception:  # noqa: BLE001  (replaced while being read: the next one will do)
                seen = None
        time.sleep(0.05)


def sigkill_at_step(args: list[str], run: Path, step: int) -> None:
    """Start ``openaff train ARGS --output RUN`` and SIGKILL it once its last.pt has reached ``step``."""
    proc = subprocess.Popen([sys.executable, "-m", "openaff", "train", *args, "--output", str(run)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(proc, run / "last.pt", step)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def ddp_vs_single(args: list[str], tmp_path: Path, init_kwargs: dict, output: bool = True) -> float:
    """Train ``openaff train ARGS`` in one process (``tmp_path/single``) and in 2 gloo processes under torchrun
    (``tmp_path/ddp``); returns ``|w_ddp - w_single| / |w_single - w_init|`` over the trained parameters.

    ``output=False`` gives the 2-process run no ``--output``: rank 0 picks the fresh run folder under
    ``tmp_path/runs`` and every rank must use it.
    """
    single = openaff("train", *args, "--output", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    where = ["--output", str(tmp_path / "ddp")] if output else []
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "openaff", "train", *args, *where], env=env(), capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    if not output:
        (run,) = (tmp_path / "runs").iterdir()
        run.rename(tmp_path / "ddp")
    import timm
    import torch

    from openaff.training.checkpoint import load_checkpoint

    torch.manual_seed(0)  # the training's initial weights
    init = timm.create_model(**init_kwargs).state_dict()
    a = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")["model"]
    keys = [k for k, v in init.items() if v.is_floating_point() and "running" not in k]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
    update = torch.cat([(a[k] - init[k]).flatten() for k in keys]).norm()
    return float(diff / update)


# One step, so that the bound is one of float rounding. The two runs differ only in rounding (the
# all-reduce's order, SyncBN's statistics summed per process): 4e-6 of the update after one step on
# the 2-core AMD EPYC VM. Each further step of these tiny models multiplies any such
# difference by ~100, measured: a 1e-7 relative perturbation of one process's initial weights ends
# 4.6e-4 / 3.7e-3 away after 2 / 4 steps, as the 2-process run does (4.3e-4 / 6.2e-3), so a multi-step
# bound would measure the model's sensitivity, not DDP (issue 23: 7.6e-3 after 4 steps on AMD failed
# a 2e-3 bound). A real difference (a wrong batch, statistics or loss average) is >= 1e-2 at step one.
ONE_STEP_BOUND = 1e-4


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:  # noqa: ANN001  (pytest's capsys)
    """``openaff ARGV`` in this process: (exit status, stdout, stderr)."""
    from openaff.cli import main

    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's own exits
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def train_kill_resume(args: list[str], tmp_path: Path, total: int, first: int, last: int) -> tuple[dict, dict, str]:
    """Train ``args`` uninterrupted (``tmp_path/full``), then again (``tmp_path/killed``) SIGKILLed at a random
    step in ``[first, total - last)`` and resumed; returns both runs' last.pt and the resume's console output,
    after checking the kill landed inside the run and the resume said where it continued."""
    import torch

    from openaff.training.checkpoint import load_checkpoint

    full = openaff("train", *args, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    run = tmp_path / "killed"
    sigkill_at_step(args, run, int(torch.randint(first, total - last, (1,))))
    stopped = load_checkpoint(run / "last.pt")
    assert stopped["global_step"] < total
    resumed = openaff("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    said = resumed.stderr + resumed.stdout
    assert f"resuming {run} at epoch {stopped['epoch']}, step {stopped['step']}" in said
    return load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(run / "last.pt"), said
