"""Shared fixtures: tiny random-weight InternVL checkpoints made offline, once per test session.

* ``tiny_ckpt``: path to a tiny Qwen2-style checkpoint (template Hermes-2) in the original
  InternVL-Chat layout (``interleaf init-model --preset tiny``).
* ``tiny_ckpt_hf``: the same weights saved in the transformers-native ``-hf`` layout.
* ``noise_image(seed, w=500, h=300)``: a seeded RGB PIL image of uniform random pixels.
* ``gray_video(path, n_frames, codec="ffv1", pix_fmt="yuv444p", rate=10)``: writes a 64x48 clip whose
  frame k is flat gray level 8*k, so a decoded frame tells its own index.
* ``torchrun(*args)``: ``interleaf`` under torchrun, 2 CPU ranks on a free port; returns the
  ``CompletedProcess`` after asserting it succeeded.
* ``loopback_http(Handler)``: a context manager serving a ``BaseHTTPRequestHandler`` class on
  127.0.0.1 from a thread; yields its base URL (``http://127.0.0.1:PORT``).

Both directories are read-only by convention: copy them before modifying anything.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models, and two xdist workers on two cores: one torch thread each avoids OpenMP
    oversubscription (thread start-up costs more than it saves here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from interleaf.model import init_model

    return init_model("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", layout="internvl_chat", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_hf(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from interleaf.model import load_checkpoint, save_checkpoint

    model, tokenizer = load_checkpoint(tiny_ckpt)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-hf", layout="hf")


@pytest.fixture(scope="session")
def noise_image():
    import numpy as np
    from PIL import Image

    def make(seed: int, w: int = 500, h: int = 300) -> Image.Image:
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))

    return make


@pytest.fixture(scope="session")
def gray_video():
    def write(path, n_frames: int, codec: str = "ffv1", pix_fmt: str = "yuv444p", rate: int = 10) -> None:
        import av
        import numpy as np

        container = av.open(str(path), "w")
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for k in range(n_frames):
            arr = np.full((48, 64, 3), 8 * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()

    return write


@pytest.fixture
def torchrun(tmp_path_factory):
    """Runs ``torchrun --standalone --nproc_per_node 2 -m interleaf.cli *args``. ``--standalone``
    picks a free rendezvous port: two xdist workers starting torchrun on the default port 29500 at
    once joined each other's rendezvous, and a rank aborted. Each rank must also have freed its
    process group by exit (tests/torchrun_probe lists the gloo threads still running then)."""
    import os
    import subprocess
    import sys

    probe = Path(__file__).parent / "torchrun_probe"

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        report = tmp_path_factory.mktemp("torchrun-probe")
        path = os.pathsep.join(p for p in (str(probe), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "INTERLEAF_PROBE_DIR": str(report)}
        proc = subprocess.run(
            [*cmd, "-m", "interleaf.cli", *args], capture_output=True, text=True, env=env, timeout=240
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        left = {f"rank{r}": (report / f"rank{r}").read_text() for r in range(2)}
        assert not any(left.values()), f"gloo threads alive at exit (process group not freed): {left}"
        return proc

    return run


@contextmanager
def _loopback_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="session")
def loopback_http():
    return _loopback_http
