"""Transformer Engine layers in the Muon routing and layout, without TE: test doubles named like megatron's TE
wrappers (``megatron/core/extensions/transformer_engine.py``) carrying the attributes those wrappers set.

What the doubles copy from megatron-core 0.19.2 and TE:
- TE's ``Linear`` / ``LayerNormLinear`` ``reset_parameters`` mark every weight ``tensor_model_parallel=True``,
  ``partition_dim`` 1 for row-parallel and 0 otherwise, ``partition_stride=1``.
- megatron's wrappers keep the TP group as ``_tp_group``; for experts with EP > 1 or expert-TP > 1 they hand TE
  ``tp_group=None`` (megatron does the expert communication), so TE's own ``tp_group`` attribute is None there.
- ``TEGroupedLinear`` has ``weight0 … weight{num_gemms-1}`` and megatron's ``_set_expert_parameter_attributes``
  (used here as is) sets their TP attributes from the parallel mode.
- ``TELayerNormColumnParallelLinear`` has the pre-norm fused in: ``layer_norm_weight`` next to ``weight``.
The same tests on the real TE modules are in tests/gpu/test_te_layout.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from megatron.core.extensions.transformer_engine import _set_expert_parameter_attributes

from megatron_muon.optim.layout import LayoutConfig, megatron_param_pieces, module_tp_group
from megatron_muon.optim.param_groups import route_parameters

HIDDEN, FFN, EXPERT_FFN, HEADS, GROUPS, HEAD_DIM = 16, 32, 8, 4, 2, 4
CONFIG = SimpleNamespace(
    kv_channels=HEAD_DIM,
    num_attention_heads=HEADS,
    num_query_groups=GROUPS,
    gated_linear_unit=True,
    attention_output_gate=False,
)


class FakeGroup:
    """A process group of ``size`` ranks seen from ``rank`` (``torch.distributed`` is patched to read it)."""

    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank


@pytest.fixture
def fake_groups(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: group.size)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: group.rank)


def _te_weight(rows: int, cols: int, partition_dim: int) -> torch.nn.Parameter:
    weight = torch.nn.Parameter(torch.randn(rows, cols))
    weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, partition_dim, 1
    return weight


class TELinear(torch.nn.Module):
    parallel_mode = None

    def __init__(self, rows: int, cols: int, tp_group) -> None:
        super().__init__()
        self.weight = _te_weight(rows, cols, 1 if self.parallel_mode == "row" else 0)
        self._tp_group = tp_group  # megatron's
        self.tp_group = tp_group  # TE's own


class TEColumnParallelLinear(TELinear):
    parallel_mode = "column"


class TERowParallelLinear(TELinear):
    parallel_mode = "row"


class TELayerNormColumnParallelLinear(TELinear):
    parallel_mode = "column"

    def __init__(self, rows: int, cols: int, tp_group) -> None:
        super().__init__(rows, cols, tp_group)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(cols))


class TEGroupedLinear(torch.nn.Module):
    parallel_mode = None

    def __init__(self, num_gemms: int, rows: int, cols: int, expert_tp_group, *, bias: bool = False) -> None:
        super().__init__()
        self.num_gemms = num_gemms
        for index in range(num_gemms):
            self.register_parameter(f"weight{index}", torch.nn.Parameter(torch.randn(rows, cols)))
            if bias:
                self.register_parameter(f"bias{index}", torch.nn.Parameter(torch.zeros(rows)))
        _set_expert_parameter_attributes(self, self.parallel_mode, use_expert_pgs=True)
        self._tp_group = expert_tp_group
        self.tp_group = None  # megatron passes TE no group for experts (explicit expert communication)


class TEColumnParallelGroupedLinear(TEGroupedLinear):
    parallel_mode = "column"


class TERowParallelGroupedLinear(TEGroupedLinear):
    parallel_mode = "row"


def _namespace_module(**children) -> torch.nn.Module:
    module = torch.nn.Module()
    for name, child in children.items():
        setattr(module, name, child)
    return module


def te_model(tp_group, expert_tp_group, *, ep_rank: int = 1, local_experts: int = 2, bias: bool = False):
    """A two-layer GPT-shaped module tree on TE layers: layer 0 dense, layer 1 MoE with grouped experts, holding
    local experts ``ep_rank * local_experts …`` of an EP group; shards of a TP / expert-TP group of size 2."""
    tp, etp = tp_group.size, expert_tp_group.size
    qkv_rows = (HEADS + 2 * GROUPS) * HEAD_DIM // tp

    def attention():
        return _namespace_module(
            linear_qkv=TELayerNormColumnParallelLinear(qkv_rows, HIDDEN, tp_group),
            linear_proj=TERowParallelLinear(HIDDEN, HEADS * HEAD_DIM // tp, tp_group),
        )

    dense = _namespace_module(
        self_attention=attention(),
        mlp=_namespace_module(
            linear_fc1=TELayerNormColumnParallelLinear(2 * FFN // tp, HIDDEN, tp_group),
            linear_fc2=TERowParallelLinear(HIDDEN, FFN // tp, tp_group),
        ),
    )
    experts = _namespace_module(
        linear_fc1=TEColumnParallelGroupedLinear(
            local_experts, 2 * EXPERT_FFN // etp, HIDDEN, expert_tp_group, bias=bias
        ),
        linear_fc2=TERowParallelGroupedLinear(local_experts, HIDDEN, EXPERT_FFN // etp, expert_tp_group),
    )
    moe = _namespace_module(router=torch.nn.Linear(HIDDEN, 8, bias=False), experts=experts)
    moe.local_expert_indices = [ep_rank * local_experts + i for i in range(local_experts)]
    moe_layer = _namespace_module(self_attention=attention(), mlp=moe)
    dense.layer_number, moe_layer.layer_number = 1, 2
    embedding = _namespace_module(word_embeddings=torch.nn.Embedding(64, HIDDEN))
    embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
    decoder = _namespace_module(layers=torch.nn.ModuleList([dense, moe_layer]))
    return _namespace_module(embedding=embedding, decoder=decoder)


# ---------------------------------------------------------------------------------------------------------
# Routing


def test_te_linears_and_grouped_expert_weights_go_to_muon_the_rest_to_adamw():
    model = te_model(FakeGroup(1, 0), FakeGroup(1, 0), bias=True)
    routing = route_parameters([model])
    muon = sorted(r.name for r in routing.muon)
    adamw = sorted(r.name for r in routing.adamw)
    layer = "decoder.layers.{}."
    assert muon == sorted(
        [
            layer.format(i) + f"self_attention.{n}.weight"
            for i in (0, 1)
            for n in ("linear_qkv", "linear_proj")
        ]
        + [layer.format(0) + f"mlp.{n}.weight" for n in ("linear_fc1", "linear_fc2")]
        + [
            layer.format(1) + f"mlp.experts.{n}.weight{e}"
            for n in ("linear_fc1", "linear_fc2")
            for e in (0, 1)
        ]
    )
    # TE's fused pre-norms, the grouped biases, the router and the embedding stay with AdamW.
    assert layer.format(0) + "self_attention.linear_qkv.layer_norm_weight" in adamw
    assert layer.format(0) + "mlp.linear_fc1.layer_norm_weight" in adamw
    assert layer.format(1) + "mlp.experts.linear_fc1.bias0" in adamw
    assert layer.format(1) + "mlp.router.weight" in adamw
    assert "embedding.word_embeddings.weight" in adamw
    assert len(muon) + len(adamw) == len(list(model.parameters()))


def test_a_single_grouped_expert_weight_is_refused():
    grouped = TEColumnParallelGroupedLinear(2, 16, HIDDEN, FakeGroup(1, 0))
    grouped.weight = torch.nn.Parameter(torch.randn(2, 16, HIDDEN))  # TE >= 2.14, moe_single_grouped_weight
    model = _namespace_module(experts=_namespace_module(linear_fc1=grouped))
    with pytest.raises(ValueError, match="moe_single_grouped_weight=False"):
        route_parameters([model])


def test_numbered_weights_of_an_unknown_module_are_refused():
    class SomeGroupedExperts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight0 = torch.nn.Parameter(torch.randn(4, 4))

    model = _namespace_module(experts=_namespace_module(linear_fc1=SomeGroupedExperts()))
    with pytest.raises(ValueError, match="numbered weights of a SomeGroupedExperts"):
        route_parameters([model])


# ---------------------------------------------------------------------------------------------------------
# Layout


def pieces_by_name(model):
    routing = route_parameters([model])
    return {
        r.name: megatron_param_pieces(
            r.name, r.param, r.module, CONFIG, routing.module_paths[0], LayoutConfig()
        )
        for r in routing.muon
    }


def test_grouped_experts_are_keyed_by_global_expert_id_like_sequential_experts(fake_groups):
    # EP rank 1 of 2 with two local experts: weight0 / weight1 are global experts 2 / 3; expert-TP rank 1 of 2.
    pieces = pieces_by_name(te_model(FakeGroup(2, 0), FakeGroup(2, 1)))
    fc1 = pieces["decoder.layers.1.mlp.experts.linear_fc1.weight1"]
    assert [p.key for p in fc1] == [
        "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight/gate",
        "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight/up",
    ]
    # The gate / up halves of the local [gate_t; up_t] rows, each shard 1 of 2 of an (EXPERT_FFN, HIDDEN) matrix.
    for piece, offset in zip(fc1, (0, EXPERT_FFN // 2), strict=True):
        assert (piece.shape, piece.shard_dim, piece.num_shards, piece.shard_index) == (
            (EXPERT_FFN, HIDDEN),
            0,
            2,
            1,
        )
        assert (piece.rows.offset, piece.rows.length) == (offset, EXPERT_FFN // 2)
    (fc2,) = pieces["decoder.layers.1.mlp.experts.linear_fc2.weight0"]
    assert fc2.key == "decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"
    assert (fc2.shape, fc2.shard_dim, fc2.num_shards, fc2.shard_index) == ((HIDDEN, EXPERT_FFN), 1, 2, 1)


def test_te_expert_shards_come_from_megatrons_tp_group_not_tes():
    grouped = TEColumnParallelGroupedLinear(2, 8, HIDDEN, expert_tp_group="megatron's expert-TP group")
    assert grouped.tp_group is None  # what TE holds for experts
    assert module_tp_group(grouped) == "megatron's expert-TP group"


def test_te_attention_and_dense_mlp_are_split_like_the_local_layers(fake_groups):
    pieces = pieces_by_name(te_model(FakeGroup(2, 1), FakeGroup(1, 0)))
    qkv = pieces["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert [p.key.rsplit("/", 1)[-1] for p in qkv] == ["q", "k", "v"]
    heads_per_group = HEADS // GROUPS
    assert [p.shape for p in qkv] == [
        (HEADS * HEAD_DIM, HIDDEN),
        (GROUPS * HEAD_DIM, HIDDEN),
        (GROUPS * HEAD_DIM, HIDDEN),
    ]
    assert all((p.num_shards, p.shard_index, p.rows.repeats) == (2, 1, GROUPS // 2) for p in qkv)
    assert qkv[0].rows.period == (heads_per_group + 2) * HEAD_DIM
    (proj,) = pieces["decoder.layers.0.self_attention.linear_proj.weight"]
    assert (proj.shape, proj.shard_dim, proj.num_shards) == ((HIDDEN, HEADS * HEAD_DIM), 1, 2)
    fc1 = pieces["decoder.layers.0.mlp.linear_fc1.weight"]
    assert [(p.key.rsplit("/", 1)[-1], p.shape) for p in fc1] == [
        ("gate", (FFN, HIDDEN)),
        ("up", (FFN, HIDDEN)),
    ]


def test_grouped_and_sequential_experts_give_the_same_keys(fake_groups):
    """Muon state saved from a TE grouped-GEMM model names the same matrices as one from the local spec."""
    grouped = pieces_by_name(te_model(FakeGroup(1, 0), FakeGroup(1, 0), ep_rank=0))
    grouped_keys = {p.key for name, ps in grouped.items() if ".experts." in name for p in ps}

    # SequentialMLP (moe_grouped_gemm=False) of the TE spec: local_experts.{i} with TE column/row linears.
    sequential_experts = torch.nn.Module()
    sequential_experts.local_experts = torch.nn.ModuleList(
        [
            _namespace_module(
                linear_fc1=TEColumnParallelLinear(2 * EXPERT_FFN, HIDDEN, FakeGroup(1, 0)),
                linear_fc2=TERowParallelLinear(HIDDEN, EXPERT_FFN, FakeGroup(1, 0)),
            )
            for _ in range(2)
        ]
    )
    model = te_model(FakeGroup(1, 0), FakeGroup(1, 0), ep_rank=0)
    model.decoder.layers[1].mlp.experts = sequential_experts
    sequential = pieces_by_name(model)
    sequential_keys = {p.key for name, ps in sequential.items() if ".experts." in name for p in ps}
    assert grouped_keys == sequential_keys
    assert len(grouped_keys) == 2 * 3  # two experts x (gate, up, fc2)


# ---------------------------------------------------------------------------------------------------------
# The TE model path of the builder (runs on the GPU: tests/gpu/test_te_layout.py)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_te_model_path_is_refused_without_cuda_in_one_line():
    from megatron_muon.config import ModelConfig
    from megatron_muon.models.gpt_moe import build_transformer_config

    with pytest.raises(ValueError, match=r"^transformer_impl='transformer_engine' needs a CUDA GPU") as error:
        build_transformer_config(ModelConfig(transformer_impl="transformer_engine"), tp=1, pp=1, ep=1)
    assert "\n" not in str(error.value)


def test_an_unknown_transformer_impl_is_refused():
    from megatron_muon.config import ModelConfig
    from megatron_muon.models.gpt_moe import build_transformer_config

    with pytest.raises(ValueError, match=r"transformer_impl='te'; valid: \['local', 'transformer_engine'\]"):
        build_transformer_config(ModelConfig(transformer_impl="te"), tp=1, pp=1, ep=1)
