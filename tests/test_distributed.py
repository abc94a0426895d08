"""Data-parallel training on the CPU: two gloo processes, tiny model, a few steps."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import distributed, losses
from helpers.checkpoint import load_checkpoint
from helpers.config import ModelConfig
from helpers.errors import UserError
from helpers.network import build_models
from helpers.train import Fakes, RunBatches, TrainConfig, Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(text_dim=32, z_dim=8, cond_dim=8, ng=128, nd=4, num_stages=1)  # 64 px, one stage
GLOBAL_BATCH = 4


def tiny_config(**overrides) -> TrainConfig:
    # no DiffAugment: its random draws depend on how the batch is split
    values = dict(model=ModelConfig(**TINY), batch_size=GLOBAL_BATCH, steps=2, diffaugment="")
    return TrainConfig(**{**values, **overrides})


def cpu_rank(rank: int, world_size: int = 2) -> distributed.Distributed:
    return distributed.Distributed(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"),
                                   backend="gloo", timeout_s=60.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- without processes


def test_single_process_runs_take_no_distributed_path(monkeypatch, tiny_clip):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_environment(torch.device("cpu")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1: one process, the plain path
    assert distributed.from_environment(torch.device("cpu")) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="torchrun"):
        distributed.from_environment(torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    assert Trainer(tiny_config(), clip=tiny_clip).sync is None  # the trainer's hooks stay off


def test_ranks_see_disjoint_rows_whose_union_is_the_global_batch():
    full = list(RunBatches(10, 4, seed=5, start_step=0, total_steps=7))  # 2 steps per epoch, 4 epochs
    for world_size in (2, 4):
        shards = [list(RunBatches(10, 4, seed=5, start_step=0, total_steps=7, rank=r, world_size=world_size))
                  for r in range(world_size)]
        for step, rows in enumerate(zip(*shards)):
            assert sum(len(r) for r in rows) == 4
            assert sorted(x for r in rows for x in r) == sorted(full[step])  # same items and item seeds
    # a resume mid-epoch continues every rank's shard
    assert list(RunBatches(10, 4, seed=5, start_step=3, total_steps=7, rank=1, world_size=2)) == \
        list(RunBatches(10, 4, seed=5, start_step=0, total_steps=7, rank=1, world_size=2))[3:]


def test_batch_split_rank_seeds_and_the_logged_line():
    cfg = tiny_config(batch_size=8)
    assert cpu_rank(0).rows_per_rank(8) == 4
    with pytest.raises(UserError, match="multiple of 4"):
        cpu_rank(0, world_size=4).rows_per_rank(6)
    with pytest.raises(UserError, match="at least 2 images per process"):
        cpu_rank(0, world_size=4).rows_per_rank(4)
    line = cpu_rank(0).describe(cfg)
    assert "effective batch 8 = 4 per process x 2" in line and "not scaled" in line and "lr_g=0.0002" in line
    seeds = {distributed.rank_step_seed(0, rank, step) for rank in range(4) for step in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert distributed.rank_step_seed(3, 1, 7) == distributed.rank_step_seed(3, 1, 7)


def test_sync_batchnorm_keeps_parameters_and_checkpoint_keys_and_is_refused_on_the_cpu(tiny_clip):
    G, D = build_models(ModelConfig(**{**TINY, "num_stages": 2}), seed=0)
    keys = (list(G.state_dict()), list(D.state_dict()))
    params = [id(p) for p in [*G.parameters(), *D.parameters()]]
    G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in G.modules())
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in [*G.modules(), *D.modules()])
    assert (list(G.state_dict()), list(D.state_dict())) == keys  # checkpoints stay interchangeable
    assert [id(p) for p in [*G.parameters(), *D.parameters()]] == params  # the optimisers stay valid
    trainer = Trainer(tiny_config(sync_batchnorm=True), clip=tiny_clip)
    with pytest.raises(UserError, match="SyncBatchNorm runs on CUDA only"):
        cpu_rank(0).prepare(trainer)  # refused before any communication
    assert trainer.sync is None


# --------------------------------------------------------------------------- two gloo processes


def global_batch(features: Path) -> dict:
    from torch.utils.data import default_collate

    from helpers.features import FeaturesDataset
    from helpers.train import SeededItems

    items = SeededItems(FeaturesDataset(features, split="train", num_stages=1))
    return default_collate([items[(i, 100 + i)] for i in range(GLOBAL_BATCH)])


def take_rows(batch: dict, rows: slice) -> dict:
    return dict(images=[x[rows] for x in batch["images"]],
                **{k: v[rows] for k, v in batch.items() if k != "images"})


def use_global_noise(trainer: Trainer, rows: slice) -> None:
    """Draw z and the CA noise for the whole global batch and keep ``rows``: the same noise as one process."""
    def generate(text):
        g = torch.Generator().manual_seed(1000 + trainer.step)
        z = torch.randn(GLOBAL_BATCH, trainer.cfg.model.z_dim, generator=g)[rows]
        ca_noise = torch.randn(GLOBAL_BATCH, trainer.cfg.model.cond_dim, generator=g)[rows]
        return Fakes(*trainer.G(text, z, ca_noise), z=z)

    trainer.generate = generate


def freeze_batchnorm_statistics(trainer: Trainer) -> None:
    """BatchNorm in eval mode: normalisation no longer depends on which rows share a process."""
    for m in [*trainer.G.modules(), *trainer.D.modules()]:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def run_steps(trainer: Trainer, batch: dict, rows: slice, steps: int = 2) -> list[dict]:
    freeze_batchnorm_statistics(trainer)
    use_global_noise(trainer, rows)
    return [trainer.train_step(take_rows(batch, rows)) for _ in range(steps)]


def _rank_worker(rank: int, port: int, features: str, out: str) -> None:
    """One of two gloo processes: equal steps, then a NaN on rank 1 only, then rank 1 leaves early."""
    from helpers.clip_encoder import load_clip

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = distributed.from_environment(torch.device("cpu"), timeout_s=60)
    trainer = Trainer(tiny_config(), clip=load_clip("tiny-random", device="cpu"))
    if rank == 1:  # a different start: prepare() must broadcast rank 0's weights
        with torch.no_grad():
            next(trainer.G.parameters()).add_(1.0)
    dist.prepare(trainer)
    values = run_steps(trainer, global_batch(Path(features)), slice(rank, None, 2))
    result = dict(state=copy.deepcopy(trainer.state_dict()), values=values)  # a copy: more steps follow

    real_kl = losses.kl_loss
    losses.kl_loss = lambda mu, logvar: real_kl(mu, logvar) * (float("nan") if rank == 1 else 1.0)
    try:
        trainer.train_step(take_rows(global_batch(Path(features)), slice(rank, None, 2)))
        result["nan"] = "no error"
    except TrainingDiverged as err:
        result["nan"] = str(err)
    losses.kl_loss = real_kl

    if rank == 0:  # rank 1 has gone: the next collective must fail with a clear message, not hang
        try:
            trainer.train_step(take_rows(global_batch(Path(features)), slice(0, None, 2)))
            result["peer_gone"] = "no error"
        except distributed.DistributedError as err:
            result["peer_gone"] = str(err)
    torch.save(result, Path(out) / f"rank{rank}.pt")


def flat_state(state: dict) -> dict:
    out = {f"G.{k}": v for k, v in state["G"].items()}
    for i, d in enumerate(state["D"]):
        out.update({f"D{i}.{k}": v for k, v in d.items()})
    for j, opt in enumerate([state["opt_G"], *state["opt_D"]]):
        for p, s in opt["state"].items():
            out.update({f"opt{j}.{p}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out


def test_two_ranks_equal_one_process_on_the_same_global_batch(synthetic_features, tmp_path, tiny_clip):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(free_port(), str(synthetic_features), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    single = Trainer(tiny_config(), clip=tiny_clip)
    expected = run_steps(single, global_batch(synthetic_features), slice(None))
    want = flat_state(single.state_dict())
    for r, result in enumerate(ranks):
        got = flat_state(result["state"])
        assert got.keys() == want.keys()
        for name in want:  # gradient averaging + gathered InfoNCE = the one-process step
            # Sums over rows in another order differ in the last bits, relative to each tensor's scale;
            # Adam moves a weight by about lr per step even for a tiny, rounding-sensitive gradient, so
            # weights also get 1% of one step (2e-6). Per-rank BatchNorm would differ by ~1e-3 here.
            error = (got[name].double() - want[name].double()).abs().max().item()
            assert error <= 1e-4 * want[name].double().abs().max().item() + 2e-6, (r, name, error)
        for step, (a, b) in enumerate(zip(result["values"], expected)):
            assert a.keys() == b.keys()
            for k in a:  # the logged losses are the global-batch losses
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (r, step, k)
    assert {"loss/d/stage0/align", "loss/g/stage0/align", "loss/g/stage0/clip"} <= set(expected[0])  # the gathered InfoNCE terms were compared

    # a NaN on rank 1 stops both ranks at the same step with the usual message
    for result in ranks:
        assert "diverged at step 3 (generator step)" in result["nan"] and "loss/g/kl=nan" in result["nan"]
    # rank 1 left: rank 0 raises instead of waiting forever
    assert "rank 0 of 2" in ranks[0]["peer_gone"] and "--resume" in ranks[0]["peer_gone"]


# --------------------------------------------------------------------------- torchrun and the command line


def torchrun_train(features: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "helpers", "train", "--features", str(features), "--out", str(out), "--device", "cpu",
        "--no-progress", *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_write_one_checkpoint_and_resume(synthetic_features, tmp_path):
    out = tmp_path / "run"
    small = [f"{k}={v}" for k, v in TINY.items() if k != "text_dim"]
    first = torchrun_train(synthetic_features, out, "--preset", "demo", "--steps", "2", "--batch-size", "4",
                           "--set", *small, "log_every=1", "preview_every=100", "checkpoint_every=100",
                           "snapshot_every=100")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stderr.count("effective batch 4 = 2 per process x 2") == 1  # logged once, by rank 0
    assert first.stdout.count("done: 2 steps") == 1  # rank 0 reports, rank 1 stays quiet
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.pt", "step_0000002.pt"]
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_0000000.png", "step_0000002.png"]
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]

    second = torchrun_train(synthetic_features, out, "--resume", "--steps", "3")
    assert second.returncode == 0, second.stdout + second.stderr
    ckpt = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 3 and ckpt["train_config"]["batch_size"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["G"].values() if v.is_floating_point())
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]

