"""Model-parallel layouts and checkpoint parts: the pure arithmetic the trainer builds its mesh from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from largo.runtime import checkpoint
from largo.runtime.model import ModelConfig, TinyGPT, stage_holds
from largo.runtime.parallel import Layout, LayoutError, communication_seconds, merge_states, select_state


def test_ranks_fill_the_mesh_with_tensor_fastest_then_data_then_pipeline() -> None:
    layout = Layout(world=8, tensor=2, pipeline=2)
    assert layout.data == 2
    assert [layout.coordinates(rank) for rank in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
        (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1),
    ]  # fmt: skip
    assert all(layout.rank(*layout.coordinates(rank)) == rank for rank in range(8))


def test_with_the_contracts_ranks_a_tensor_group_stays_in_a_pod_and_a_stage_is_a_pod() -> None:
    procs_per_node = 4  # RANK = node * procs_per_node + local rank
    layout = Layout(world=8, tensor=4, pipeline=2)
    for rank in range(8):
        stage, _, _ = layout.coordinates(rank)
        assert stage == rank // procs_per_node


def test_every_layout_trains_on_the_same_global_batch() -> None:
    for tensor, pipeline in ((1, 1), (2, 1), (1, 2), (2, 2), (4, 1)):
        layout = Layout(world=4, tensor=tensor, pipeline=pipeline)
        replicas = {tuple(layout.data_shards(rank)) for rank in range(4)}
        assert len(replicas) == layout.data
        assert sorted(shard for replica in replicas for shard in replica) == [0, 1, 2, 3]
    assert Layout(world=4, tensor=2).data_shards(3) == [2, 3]
    assert Layout(world=4, pipeline=2).data_shards(3) == [1, 3]  # replica 1: rank 1 (stage 0) and 3


def test_the_loss_is_reported_from_the_first_rank_of_the_last_stage() -> None:
    assert Layout(world=4).reporter == 0
    assert Layout(world=4, tensor=2).reporter == 0
    assert Layout(world=4, pipeline=2).reporter == 2
    assert Layout(world=8, tensor=2, pipeline=4).reporter == 6


def test_layouts_that_do_not_fit_are_refused_with_the_reason() -> None:
    with pytest.raises(LayoutError, match="does not divide the 4 ranks"):
        Layout(world=4, tensor=3)
    with pytest.raises(LayoutError, match=">= 1"):
        Layout(world=4, pipeline=0)
    with pytest.raises(LayoutError, match="4 heads"):
        Layout(world=8, tensor=8).check_model(ModelConfig(heads=4))
    with pytest.raises(LayoutError, match="cannot split 2 blocks"):
        Layout(world=4, pipeline=4).check_model(ModelConfig(depth=2))
    Layout(world=4, tensor=2, pipeline=2).check_model(ModelConfig(heads=4, depth=2))


def test_microbatches_are_two_per_stage_when_they_divide_the_batch() -> None:
    assert Layout(world=4, pipeline=2).microbatches(16) == 4
    assert Layout(world=4, pipeline=2).microbatches(6) == 3
    assert Layout(world=4, pipeline=4).microbatches(4) == 4
    with pytest.raises(LayoutError):
        Layout(world=4, pipeline=4).microbatches(3)


def test_communication_bytes_name_only_the_kinds_a_layout_uses() -> None:
    config = ModelConfig(context=8, width=16, depth=2)
    plain = Layout(world=4).communication_bytes(config, replica_batch=2, parameter_bytes=1000)
    assert plain == {"data": 2000, "tensor": 0, "pipeline": 0}
    sharded = Layout(world=4).communication_bytes(config, replica_batch=2, parameter_bytes=1000, fsdp=True)
    assert sharded["data"] == 3000  # FSDP gathers the parameters twice and reduce-scatters once
    split = Layout(world=4, tensor=2, pipeline=2).communication_bytes(
        config, replica_batch=2, parameter_bytes=1000
    )
    activation = 2 * 8 * 16 * 4
    assert split == {"data": 0, "tensor": 4 * 1 * activation, "pipeline": 2 * activation}


def test_gloo_operations_are_counted_by_the_kind_of_communication_they_serve() -> None:
    events = [
        ("gloo:send", 0.002),
        ("gloo:recv", 0.003),
        ("gloo:all_reduce", 0.004),
        ("gloo:all_gather_into_tensor", 0.005),
        ("gloo:reduce_scatter_tensor", 0.006),
        ("aten::mm", 1.0),  # compute: not communication
        ("c10d::allreduce_", 1.0),  # the caller's enqueueing, not gloo's run of it
    ]
    split = communication_seconds(events, tensor_parallel=True)
    assert split == pytest.approx({"pipeline": 0.005, "tensor": 0.004, "data": 0.011})
    # Without a tensor group, all-reduces are DDP's, across replicas.
    assert communication_seconds(events, tensor_parallel=False) == pytest.approx(
        {"pipeline": 0.005, "tensor": 0.0, "data": 0.015}
    )


def _stage_names(stages: int, stage: int) -> list[str]:
    torch.manual_seed(0)
    return list(TinyGPT(ModelConfig(depth=3)).keep_stage(stages, stage).state_dict())


def test_stages_keep_the_whole_models_names_and_together_hold_all_of_it() -> None:
    whole = list(TinyGPT(ModelConfig(depth=3)).state_dict())
    first, last = _stage_names(2, 0), _stage_names(2, 1)
    assert not set(first) & set(last)
    assert sorted(first + last) == sorted(whole)
    assert "tokens.weight" in first
    assert "head.weight" in last
    assert "blocks.2.query.weight" in last
    assert "blocks.1.query.weight" in first


def test_a_model_built_as_a_stage_has_what_the_whole_model_keeps_for_it() -> None:
    config = ModelConfig(depth=3)
    whole = list(TinyGPT(config).state_dict())
    for stages in (1, 2, 3):
        for stage in range(stages):
            built = list(TinyGPT(config, stages, stage).state_dict())
            assert built == _stage_names(stages, stage)
            assert built == [name for name in whole if stage_holds(name, config.depth, stages, stage)]
    assert stage_holds("something.else", 3, 2, 1)  # not the model's: left for the load to refuse by name
    with pytest.raises(ValueError, match="4 stages cannot split 3 blocks"):
        TinyGPT(config, 4, 0)


def test_a_checkpoint_is_split_by_stage_and_merged_back_whole() -> None:
    model = TinyGPT(ModelConfig(depth=3))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    optimizer.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    parts = [select_state(model_state, optimizer_state, _stage_names(2, stage)) for stage in (0, 1)]
    assert all(part_optimizer is not None for _, part_optimizer in parts)
    merged_model, merged_optimizer = merge_states((m, o) for m, o in parts if o is not None)
    assert merged_model.keys() == model_state.keys()
    assert merged_optimizer["state"].keys() == optimizer_state["state"].keys()
    assert merged_optimizer["param_groups"][0]["params"] == optimizer_state["param_groups"][0]["params"]
    assert merged_optimizer["param_groups"][0]["lr"] == optimizer_state["param_groups"][0]["lr"]


def _v1_checkpoint(model: TinyGPT, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """What the trainer wrote before queries, keys and values were separate: fused qkv, position-keyed
    optimizer state (as a DDP run's optimizer.state_dict())."""
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if ".query." in name:
            parts = [model.state_dict()[name.replace("query", kind)] for kind in ("query", "key", "value")]
            fused[name.replace("query", "qkv")] = torch.cat(parts)
        elif ".key." not in name and ".value." not in name:
            fused[name] = tensor
    names = list(fused)
    by_name = dict(
        zip([n for n, _ in model.named_parameters()], optimizer.state_dict()["state"].values(), strict=True)
    )
    state = {}
    for index, name in enumerate(names):
        if ".qkv." in name:
            entries = [by_name[name.replace("qkv", kind)] for kind in ("query", "key", "value")]
            state[index] = {
                key: torch.cat([entry[key] for entry in entries])
                if entries[0][key].dim()
                else entries[0][key]
                for key in entries[0]
            }
        else:
            state[index] = by_name[name]
    group = {**optimizer.state_dict()["param_groups"][0], "params": list(range(len(names)))}
    return {
        "model": fused,
        "optimizer": {"state": state, "param_groups": [group]},
        "rng": torch.get_rng_state(),
        "config": None,
        "format": checkpoint.FORMAT_V1,
        "step": 7,
    }


def test_a_v1_checkpoint_reads_back_as_the_same_model_and_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = TinyGPT(ModelConfig(depth=2))
    optimizer = torch.optim.AdamW(model.parameters())
    tokens = torch.randint(0, 256, (2, 8))
    model(tokens, tokens).backward()
    optimizer.step()
    torch.save(_v1_checkpoint(model, optimizer), checkpoint.checkpoint_path(tmp_path, 7))

    state = checkpoint.read(checkpoint.checkpoint_path(tmp_path, 7), 7)
    assert state["format"] == checkpoint.FORMAT
    restored = TinyGPT(ModelConfig(depth=2))
    restored.load_state_dict(state["model"])
    with torch.no_grad():
        assert torch.equal(restored(tokens, tokens), model(tokens, tokens))
    names = [name for name, _ in model.named_parameters()]
    assert sorted(state["optimizer"]["param_groups"][0]["params"]) == sorted(names)  # matched by name
    for name, entries in zip(names, optimizer.state_dict()["state"].values(), strict=True):
        assert torch.equal(state["optimizer"]["state"][name]["exp_avg"], entries["exp_avg"]), name


def test_a_file_of_another_format_or_step_is_refused(tmp_path: Path) -> None:
    path = checkpoint.checkpoint_path(tmp_path, 5)
    torch.save({"format": "other/v9", "step": 5, "model": {}}, path)
    with pytest.raises(checkpoint.CheckpointError, match="other/v9"):
        checkpoint.read(path, 5)
    with pytest.raises(checkpoint.CheckpointError, match="of step 6"):
        checkpoint.read(path, 6)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.read(path, 5)


@pytest.mark.parametrize(
    ("saved", "now", "differs"),
    [
        (ModelConfig(depth=4), ModelConfig(depth=2), "depth 4 (now 2)"),
        (ModelConfig(width=32, heads=4), ModelConfig(width=64), "width 32 (now 64)"),
        (ModelConfig(context=32), ModelConfig(context=64), "context 32 (now 64)"),
        (ModelConfig(heads=8), ModelConfig(heads=4), None),  # the heads are in no tensor's shape
        (ModelConfig(), ModelConfig(), None),
    ],
)
def test_a_checkpoint_that_records_no_shape_is_compared_on_what_its_tensors_say(
    tmp_path: Path, saved: ModelConfig, now: ModelConfig, differs: str | None
) -> None:
    """Written before checkpoints recorded their model: a deeper one resumed into a shallower model lost
    its last blocks without a word, a narrower one failed every attempt on a size mismatch."""
    from largo.runtime.engine_host import model_config
    from largo.runtime.train import shape_mismatch

    model = TinyGPT(saved)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros((1, 4), dtype=torch.long), torch.zeros((1, 4), dtype=torch.long)).backward()
    optimizer.step()
    torch.save(_v1_checkpoint(model, optimizer), checkpoint.checkpoint_path(tmp_path, 7))
    state = checkpoint.load_latest(tmp_path)
    assert state is not None
    assert "config" not in state or state["config"] is None
    assert shape_mismatch(state, now) == differs
    served = model_config(state)
    assert (served.depth, served.width, served.context) == (saved.depth, saved.width, saved.context)
    assert served.heads == 4
