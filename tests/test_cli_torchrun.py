"""``captum-pattern fit`` on several processes: torchrun on the CPU with gloo.

Every process is a real ``python -m captum_pattern fit``; the two-process fit
must give the single-process patterns to float64 rounding (``--precision
float64``: each image is preprocessed in float32 the same way on any rank, then
every product and sum is float64, so only the order of the sums differs).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import write_images
from PIL import Image

from captum_pattern import Patterns
from captum_pattern.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{ROOT / 'tests' / 'dist_models.py'}:interrupted"
KINDS = ("relu", "relu_negative", "linear")


@pytest.fixture
def folder(tmp_path):
    """Eleven images (an odd count: the two shards differ by one), sizes varying."""
    return write_images(tmp_path / "images", 11, seed=2, digits=2)


def _args(folder, out, *extra):
    return [
        "fit", MODEL, str(folder), "--image-size", "16", "--batch-size", "2", "--workers", "0",
        "--precision", "float64", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def _env(**variables):
    env = {k: v for k, v in os.environ.items() if k not in ("STOP_AT_BATCH", "FAIL_RANK")}
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **variables}


def _torchrun(args, **variables):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += ["-m", "captum_pattern", *args]
    return subprocess.run(
        cmd, env=_env(**variables), capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def _same(merged, single):
    assert set(merged) == set(single)
    for name in single:
        assert merged[name].n_samples == single[name].n_samples, name
        for kind in KINDS:
            a, b = merged[name].pattern(kind), single[name].pattern(kind)
            assert a.dtype == b.dtype == torch.float64
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (name, kind, (a - b).abs().max())


@pytest.fixture
def single(folder, tmp_path, monkeypatch):
    monkeypatch.delenv("STOP_AT_BATCH", raising=False)
    out = tmp_path / "single.safetensors"
    assert main(_args(folder, out)) == 0
    return Patterns.load(out)


def test_two_processes_write_the_one_process_patterns(folder, tmp_path, single):
    out = tmp_path / "two.safetensors"
    done = _torchrun(_args(folder, out))
    assert done.returncode == 0, done.stderr
    merged = Patterns.load(out)
    assert merged.settings["world_size"] == 2
    _same(merged, single)
    assert single["fc"].n_samples == 11  # every image once: shards of 6 and 5, none padded
    assert done.stdout.count("wrote ") == 1  # rank 0 writes and reports
    assert "11 images on 2 processes" in done.stdout
    assert not list(tmp_path.glob("*.checkpoint*"))  # per-rank checkpoints and plans cleaned


@pytest.mark.slow  # three launches of two processes: about 50 s on two shared cores
def test_an_interrupted_two_process_fit_resumes(folder, tmp_path, single):
    out, checkpoint = tmp_path / "two.safetensors", tmp_path / "fit.ckpt"
    args = _args(folder, out, "--checkpoint", str(checkpoint), "--checkpoint-every", "1")
    stopped = _torchrun(args, STOP_AT_BATCH="2")  # both ranks stop when batch 2 starts
    assert stopped.returncode != 0 and not out.exists()
    assert stopped.stdout.count("interrupted; continue with the same command and --resume") == 2
    for rank in (0, 1):
        assert Path(f"{checkpoint}.rank{rank}").exists()
        assert Path(f"{checkpoint}.rank{rank}.json").exists()
    assert main([*args, "--resume"]) == 2  # one process cannot continue a two-process fit
    resumed = _torchrun([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "rank 0: resuming after batch 1" in resumed.stdout
    assert "rank 1: resuming after batch 1" in resumed.stdout
    _same(Patterns.load(out), single)
    assert not list(tmp_path.glob("fit.ckpt*"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_by_hand(folder, out, timeout, **variables):
    """Start ranks 0 and 1 by hand (no torchrun agent that would kill the survivor)."""
    port = str(_free_port())
    args = [sys.executable, "-m", "captum_pattern", *_args(folder, out, "--timeout", timeout)]
    procs = []
    for rank in (0, 1):
        env = _env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port, STOP_AT_BATCH="2", FAIL_RANK="1", **variables,
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def _survivor_message(rank0, start):
    _, err = rank0.communicate(timeout=120)
    elapsed = time.monotonic() - start
    assert rank0.returncode == 2, err
    assert "rank 0 of 2: the other processes did not all answer" in err, err
    assert "continue with the same command and --resume" in err, err
    return err, elapsed


def test_a_failing_rank_stops_the_others_with_a_message(folder, tmp_path):
    out = tmp_path / "two.safetensors"
    start = time.monotonic()
    rank0, rank1 = _two_by_hand(folder, out, "20")
    _, err1 = rank1.communicate(timeout=120)
    assert rank1.returncode != 0 and "rank 1 breaks down on purpose" in err1
    err, elapsed = _survivor_message(rank0, start)
    assert elapsed < 20 + 60, err  # within the timeout (plus start-up on two shared cores)
    assert not out.exists()


@pytest.mark.slow  # waits for the timeout
def test_a_hanging_rank_stops_the_others_after_the_timeout(folder, tmp_path):
    out = tmp_path / "two.safetensors"
    start = time.monotonic()
    rank0, rank1 = _two_by_hand(folder, out, "8", HANG="1")
    try:
        err, elapsed = _survivor_message(rank0, start)
    finally:
        rank1.kill()
        rank1.communicate()
    assert "--timeout 8 s" in err
    assert elapsed > 8  # it did wait for the stuck rank, and then stopped
    assert not out.exists()


@pytest.mark.parametrize("count", [0, 1, 5, 10, 11, 97])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_the_shards_hold_every_image_once(count, world):
    from captum_pattern.cli import _Ranks

    files = [Path(f"{i}.png") for i in range(count)]
    shards = [_Ranks(rank, world).shard(files) for rank in range(world)]
    assert sorted(p for shard in shards for p in shard) == sorted(files)
    assert max(map(len, shards)) - min(map(len, shards)) <= (1 if count else 0)
    assert shards == [_Ranks(rank, world).shard(files) for rank in range(world)]


def test_fewer_images_than_processes_is_refused_by_every_rank(tmp_path):
    root = tmp_path / "one"
    root.mkdir()
    Image.new("RGB", (20, 20), (90, 30, 200)).save(root / "only.png")
    procs = _two_by_hand(root, tmp_path / "p.safetensors", "20")
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert f"rank {rank} of 2: 1 image(s) for 2 processes" in err
