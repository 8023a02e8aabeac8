"""A checkpoint without its ``manifest.json`` is not intact (``training/checkpoint.py``, ``training/resume.py``):
an automatic resume passes it over, and it is loaded only when ``checkpoint.resume=<path>`` names it as the sole
candidate. Real torch_dist files (``torch.distributed.checkpoint``) in one process with a world-1 gloo group."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from megatron_muon.training import checkpoint_files as files


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one rank (the collectives of ``verify_checkpoint`` need one)."""
    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this test process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _checkpoint(root: Path, iteration: int, *, manifest: bool, publish: bool = True) -> Path:
    """A structurally complete checkpoint ``root/iter_N`` (torch's ``.metadata`` + shard, megatron's
    ``metadata.json``), with or without its manifest, published (marker and log) or not."""
    staging = root / f"iter_{iteration:07d}{files.PARTIAL_SUFFIX}"
    dcp.save({"weight": torch.full((4,), float(iteration))}, checkpoint_id=str(staging), no_dist=True)
    (staging / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    if manifest:
        names = files.checkpoint_files(staging)
        files.write_manifest(staging, iteration, files.file_digests(staging, names))
    if publish:
        files.publish(root, staging, iteration, keep_last=0)
        return files.iteration_dir(root, iteration)
    final = files.iteration_dir(root, iteration)
    staging.rename(final)
    return final


def test_a_checkpoint_without_manifest_is_not_intact(world_of_one, tmp_path):
    from megatron_muon.training.checkpoint import verify_checkpoint

    intact = _checkpoint(tmp_path, 10, manifest=True)
    bare = _checkpoint(tmp_path, 20, manifest=False)
    assert verify_checkpoint(intact) is None
    problem = verify_checkpoint(bare)
    assert problem is not None and "\n" not in problem, problem
    assert f"checkpoint {bare} has no manifest.json" in problem and "checkpoint.resume=" in problem, problem
    assert verify_checkpoint(bare, manifest_required=False) is None  # the structure is complete
    shutil.copy(intact / ".metadata", bare / ".metadata")  # structure still checked without the manifest
    (bare / "__0_0.distcp").write_bytes(b"")
    assert "__0_0.distcp" in (verify_checkpoint(bare, manifest_required=False) or "")


def test_automatic_resume_passes_over_a_checkpoint_without_manifest(world_of_one, tmp_path):
    from megatron_muon.training.checkpoint import CheckpointError, select_resume_checkpoint
    from megatron_muon.training.resume import choose_resume_source

    intact = _checkpoint(tmp_path, 10, manifest=True)
    _checkpoint(tmp_path, 20, manifest=False)  # the newest, the marker names it
    assert files.read_marker(tmp_path) == 20
    chosen, warnings = select_resume_checkpoint(tmp_path)
    assert chosen == intact and len(warnings) == 1 and "has no manifest.json" in warnings[0], warnings

    # An explicit path does not override an intact checkpoint of the run's own.
    explicit = choose_resume_source(
        save_dir=str(tmp_path),
        load_dir=None,
        resume=str(tmp_path / "iter_0000020"),
        finetune=False,
        warn=print,
    )
    assert explicit.path == intact and explicit.own and explicit.manifest_required, explicit

    shutil.rmtree(intact)  # nothing intact left: never a silent fresh start, never the bare one automatically
    with pytest.raises(CheckpointError, match=r"holds no intact checkpoint .* has no manifest\.json"):
        select_resume_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="holds no intact checkpoint"):
        choose_resume_source(save_dir=str(tmp_path), load_dir=None, resume="auto", finetune=False, warn=print)
    from_load_dir = choose_resume_source(  # load_dir is automatic too: its checkpoint must have a manifest
        save_dir=str(tmp_path / "new"), load_dir=str(tmp_path), resume="auto", finetune=False, warn=print
    )
    assert from_load_dir.path == tmp_path and from_load_dir.manifest_required, from_load_dir


def test_an_explicit_resume_loads_a_checkpoint_without_manifest_only_as_the_sole_candidate(
    world_of_one, tmp_path
):
    from megatron_muon.training.resume import choose_resume_source

    run, other = tmp_path / "run", tmp_path / "other"
    bare = _checkpoint(run, 20, manifest=False)
    warnings: list[str] = []
    # The run's own directory, named explicitly while nothing of the run is intact: loaded, with a warning.
    chosen = choose_resume_source(
        save_dir=str(run), load_dir=None, resume=str(bare), finetune=False, warn=warnings.append
    )
    assert chosen.path == bare and not chosen.manifest_required, chosen
    assert "no intact checkpoint of this run: starting from checkpoint.resume=" in chosen.reason, (
        chosen.reason
    )
    assert len(warnings) == 1 and "has no manifest.json" in warnings[0], warnings

    # A root holding just it is as explicit; a root holding two checkpoints is not: the manifest is required.
    sole = choose_resume_source(
        save_dir=str(other), load_dir=None, resume=str(run), finetune=True, warn=print
    )
    assert sole.path == run and not sole.manifest_required and sole.finetune, sole
    _checkpoint(run, 30, manifest=False)
    several = choose_resume_source(
        save_dir=str(other), load_dir=None, resume=str(run), finetune=True, warn=print
    )
    assert several.path == run and several.manifest_required, several
    one_of_several = choose_resume_source(
        save_dir=str(other), load_dir=None, resume=str(bare), finetune=True, warn=print
    )
    assert not one_of_several.manifest_required  # an iter_* directory names exactly one checkpoint
