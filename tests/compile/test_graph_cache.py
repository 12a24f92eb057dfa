"""The graph cache against eager execution, counting graphs with torch's own dynamo counters."""

import pytest
import torch

from compile import CompileOptions, count_new_graphs, data_pointers
from compile.models import build_preset

TOLERANCE = 1e-4  # fp32


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture
def restore_tiny_weights(graph_cache, tiny_sd15):
    """Tests below bind other weights into the shared graph; bind the fixture's seed-0 UNet again afterwards."""
    yield
    graph_cache.get(tiny_sd15.unet, "inductor")


def test_compiled_matches_eager_sd15_shape(tiny_sd15):
    eager = tiny_sd15.inputs.call(tiny_sd15.unet)
    assert max_abs_diff(tiny_sd15.first_output, eager) <= TOLERANCE
    assert tiny_sd15.lookup.entry.compile_s > 0 and tiny_sd15.lookup.entry.graphs >= 1


def test_compiled_matches_eager_sdxl_shape(tiny_sdxl):
    assert tiny_sdxl.unet.config.addition_embed_type == "text_time"
    eager = tiny_sdxl.inputs.call(tiny_sdxl.unet)
    assert max_abs_diff(tiny_sdxl.first_output, eager) <= TOLERANCE


def test_same_structure_switch_reuses_graph_with_new_weights(graph_cache, tiny_sd15, restore_tiny_weights):
    second = build_preset("tiny", seed=7)
    expected = tiny_sd15.inputs.call(second)  # eager, on the second model's own weights
    first_expected = tiny_sd15.inputs.call(tiny_sd15.unet)
    pointers = data_pointers(tiny_sd15.captured)

    with count_new_graphs() as counted:
        lookup = graph_cache.get(second, "inductor")
        output = tiny_sd15.inputs.call(lookup.unet)

    assert lookup.reused and lookup.entry is tiny_sd15.lookup.entry
    assert counted.new_graphs == 0
    assert max_abs_diff(output, expected) <= TOLERANCE
    assert max_abs_diff(output, tiny_sd15.first_output) > 100 * TOLERANCE  # the new weights really are used
    assert data_pointers(tiny_sd15.captured) == pointers
    # the first model is still loaded (as with A1111's sd_checkpoints_limit > 1): it keeps its own weights
    assert max_abs_diff(tiny_sd15.inputs.call(tiny_sd15.unet), first_expected) == 0
    assert torch.equal(tiny_sd15.inputs.call(second), expected)


def test_switching_back_to_a_model_still_loaded_serves_its_weights(graph_cache, tiny_sd15, restore_tiny_weights):
    """A -> B -> A with both kept alive: the graph must serve A's weights again, not B's."""
    first, second = tiny_sd15.unet, build_preset("tiny", seed=11)
    first_expected, second_expected = tiny_sd15.inputs.call(first), tiny_sd15.inputs.call(second)
    with count_new_graphs() as counted:
        for model, expected in ((second, second_expected), (first, first_expected), (second, second_expected)):
            output = tiny_sd15.inputs.call(graph_cache.get(model, "inductor").unet)
            assert max_abs_diff(output, expected) <= TOLERANCE
    assert counted.new_graphs == 0
    assert torch.equal(tiny_sd15.inputs.call(first), first_expected)


def test_in_place_reload_into_the_same_object_needs_no_rebind(graph_cache, tiny_sd15, restore_tiny_weights):
    """What A1111 does for a checkpoint with the same config: load_state_dict into the live model."""
    tiny_sd15.unet.load_state_dict(build_preset("tiny", seed=9).state_dict())
    expected = tiny_sd15.inputs.call(tiny_sd15.unet)
    with count_new_graphs() as counted:
        lookup = graph_cache.get(tiny_sd15.unet, "inductor")
        output = tiny_sd15.inputs.call(lookup.unet)
    assert lookup.reused and lookup.copied_tensors == 0 and counted.new_graphs == 0
    assert max_abs_diff(output, expected) <= TOLERANCE


def test_other_structure_is_never_served_by_the_cached_graph(graph_cache, tiny_sd15):
    before = {name: t.clone() for name, t in tiny_sd15.captured.state_dict().items()}
    for overrides in ({"in_channels": 9}, {"attention_head_dim": 4}):
        other = build_preset("tiny", seed=3, **overrides)
        lookup = graph_cache.get(other, "inductor")  # compiled lazily; not called here
        assert not lookup.reused and lookup.entry is not tiny_sd15.lookup.entry
        assert lookup.entry.key.signature != tiny_sd15.lookup.entry.key.signature
    for name, tensor in tiny_sd15.captured.state_dict().items():  # nothing was written into the 4-channel graph
        assert torch.equal(tensor, before[name]), name


def test_options_and_dtype_are_part_of_the_key(graph_cache, tiny_sd15):
    key, _ = graph_cache.key_for(tiny_sd15.unet, "inductor")
    other_options, _ = graph_cache.key_for(tiny_sd15.unet, "inductor", CompileOptions(mode="max-autotune"))
    half, _ = graph_cache.key_for(build_preset("tiny", dtype=torch.float16), "inductor")
    assert key == tiny_sd15.lookup.entry.key
    assert len({key, other_options, half}) == 3


def test_cache_is_bounded_and_reports_what_it_did():
    from compile import GraphCache

    cache = GraphCache(max_graphs=1)
    first = cache.get(build_preset("tiny"), "inductor")
    cache.get(build_preset("tiny", in_channels=9), "inductor")
    assert [entry.key for entry in cache.entries()] != [first.entry.key]
    status = cache.status()
    assert status["compiles"] == 2 and status["evictions"] == 1 and len(status["graphs"]) == 1


def test_compiled_unet_exposes_the_eager_modules_attributes(tiny_sd15):
    assert tiny_sd15.compiled.config.in_channels == 4
    assert tiny_sd15.compiled.dtype == torch.float32



def test_a_second_graph_of_a_bound_module_never_shares_the_first_graphs_storage():
    """A module bound to one graph reads that graph's storage; a graph for other options traced from it must get
    storage of its own, or binding another checkpoint into the first graph would change what the second serves."""
    from compile import GraphCache

    cache = GraphCache(max_graphs=4)
    first_model, second_model = build_preset("tiny", seed=0), build_preset("tiny", seed=5)
    first = cache.get(first_model, "inductor")  # graphs are built lazily: nothing compiles in this test
    other_options = cache.get(first_model, "inductor", CompileOptions(mode="max-autotune-no-cudagraphs"))
    first_storage = set(data_pointers(first.entry.module).values())
    assert not first_storage & set(data_pointers(other_options.entry.module).values())
    values = {name: t.clone() for name, t in other_options.entry.module.state_dict().items()}

    cache.get(second_model, "inductor")  # another checkpoint into the first graph

    for name, tensor in other_options.entry.module.state_dict().items():
        assert torch.equal(tensor, values[name]), name
    for name, tensor in first_model.state_dict().items():  # the first model still holds its own weights
        assert torch.equal(tensor, values[name]), name


def test_an_entry_knows_which_calls_build_a_graph(tiny_sd15):
    """The first call's latent shape is recorded as compiled; a call with shapes served before is not expected
    to compile, one with a new batch size is (static shapes), without calling it."""
    entry, inputs = tiny_sd15.lookup.entry, tiny_sd15.inputs
    assert entry.compiled_shapes[0] == "x".join(str(size) for size in inputs.sample.shape)
    served = (inputs.sample, inputs.timestep)
    assert not entry.will_compile(served, {"encoder_hidden_states": inputs.encoder_hidden_states})
    unseen_batch = inputs.sample.repeat(7, 1, 1, 1)
    assert entry.will_compile((unseen_batch, inputs.timestep), {"encoder_hidden_states": inputs.encoder_hidden_states})
    longer_prompt = inputs.encoder_hidden_states.repeat(1, 3, 1)  # same image size, another context length
    assert entry.will_compile(served, {"encoder_hidden_states": longer_prompt})
    assert entry.describe()["compiled_shapes"] == entry.compiled_shapes
