"""Zoo storage: round trip, resume, corrupt / truncated shards, sharding across ranks."""
import json

import pytest
import torch

import gradmeta.inr as inr


@pytest.fixture(scope="module")
def images():
    return {"train": torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
            "test": torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))}


def test_round_trip_and_resume(tmp_path, images):
    labels = {"train": torch.arange(5), "test": torch.tensor([7, 8])}
    r = inr.build_zoo(tmp_path, images, shard_size=2, steps=3, labels=labels, config={"source": "random"})
    assert r["fitted"] == 7 and r["skipped"] == 0 and r["inrs_per_s"] > 0
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["count"] for e in index["shards"]] == [2, 2, 1, 2]
    assert index["config"]["source"] == "random" and index["shards"][3]["splits"] == ["test", "test"]
    zoo = inr.load_zoo(tmp_path)
    assert len(zoo) == 7 and zoo.splits == ["train"] * 5 + ["test"] * 2
    torch.testing.assert_close(zoo.images, torch.cat([images["train"], images["test"]]))
    torch.testing.assert_close(zoo.labels, torch.tensor([0, 1, 2, 3, 4, 7, 8]))
    torch.testing.assert_close(zoo.ids, torch.tensor([0, 1, 2, 3, 4, 0, 1]))
    torch.testing.assert_close(zoo.psnr, inr.psnr(inr.render(zoo.params, (4, 4)), zoo.images))
    test = zoo.split("test")
    assert len(test) == 2 and test.params["layers.0.weight"].shape == (2, 32, 2)
    # the same shard fitted alone equals what the zoo stored (seed per shard, not per run)
    again = inr.build_zoo(tmp_path, images, shard_size=2, steps=3, labels=labels, config={"source": "random"})
    assert again["fitted"] == 0 and again["skipped"] == 7
    (tmp_path / "shard-00001.json").unlink()
    again = inr.build_zoo(tmp_path, images, shard_size=2, steps=3, labels=labels, config={"source": "random"})
    assert again["fitted"] == 2
    torch.testing.assert_close(inr.load_zoo(tmp_path).params["layers.1.weight"], zoo.params["layers.1.weight"])


def test_sharding_over_ranks_covers_every_shard_once(tmp_path, images):
    done = [inr.build_zoo(tmp_path, images, shard_size=2, steps=2, rank=r, world_size=2)["fitted"] for r in (1, 0)]
    assert done == [4, 3]  # rank 1: shards 1 (2 INRs) and 3 (2); rank 0: shards 0 (2) and 2 (1), then the index
    assert len(inr.load_zoo(tmp_path)) == 7


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_shard_is_named_and_others_still_load(tmp_path, images, damage):
    inr.build_zoo(tmp_path, images, shard_size=2, steps=2)
    bad = tmp_path / "shard-00002.safetensors"
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        bad.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    else:
        bad.unlink()
    with pytest.raises(inr.ZooError, match="shard-00002.safetensors"):
        inr.load_zoo(tmp_path)
    with pytest.warns(UserWarning, match="shard-00002.safetensors"):
        zoo = inr.load_zoo(tmp_path, skip_corrupt=True)
    assert len(zoo) == 6
    if damage == "truncate":  # without the checksum the safetensors reader still names the file
        with pytest.raises(inr.ZooError, match="shard-00002.safetensors"):
            inr.load_zoo(tmp_path, verify=False)


def test_missing_index_is_named(tmp_path):
    with pytest.raises(inr.ZooError, match="index.json"):
        inr.load_zoo(tmp_path)


def test_zoo_images_digits_upsampled():
    x = inr.zoo_images("digits", "test", size=16, limit=3)
    assert x.shape == (3, 1, 16, 16) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match="unknown zoo source"):
        inr.zoo_images("imagenet", "train")


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one_process(tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.fail(f"torchrun not found next to {sys.executable}")
    args = ["build-zoo", "--source", "digits", "--size", "8", "--limit", "6", "--steps", "3", "--shard-size", "2",
            "--splits", "test", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    # --standalone picks a free rendezvous port (a fixed port can be taken by another job on the machine)
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "gradmeta", "inr", *args,
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and '"ranks"' in proc.stdout and "terminate called without an active exception" in proc.stderr:
        # Known and rare (about 1 run in 20 on a loaded 2-core machine): a rank aborts in native code
        # at process exit after every rank has finished and rank 0 has printed the result, even with
        # the process group destroyed first. That is not what this test checks: the zoo is rebuilt
        # once from scratch, and a second occurrence fails the test.
        shutil.rmtree(tmp_path / "two")
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    inr.build_zoo(tmp_path / "one", {"test": inr.zoo_images("digits", "test", size=8, limit=6)}, shard_size=2, steps=3,
                  lr=1e-3)
    two, one = inr.load_zoo(tmp_path / "two"), inr.load_zoo(tmp_path / "one")
    assert len(two) == 6
    for k in one.params:
        torch.testing.assert_close(two.params[k], one.params[k])
