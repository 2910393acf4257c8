"""What export learns about a decoder block by running it: shared-input groups, replayable children."""
import qft.export.blocks as blocks
import qft.export.sequential as seq


def test_groups_follow_shared_inputs(tiny, calib_tokens):
    cache = seq.capture_block_inputs(tiny, calib_tokens[:2], 2, "cpu")
    groups = blocks.discover_groups(tiny.model.layers[0], *cache[0])
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_final_children_are_those_whose_last_linear_is_done():
    stages = [[["self_attn.q_proj", "self_attn.k_proj"]], [["self_attn.o_proj"]], [["mlp.up_proj"]],
              [["mlp.down_proj"]], [["lm_proj"]]]
    assert blocks.final_children(stages) == {"self_attn": 1, "mlp": 3}


def test_children_ending_in_a_linear_are_found_by_identity(tiny, calib_tokens):
    cache = seq.capture_block_inputs(tiny, calib_tokens[:2], 2, "cpu")
    # Llama's attention returns (o_proj(x), None), its MLP returns down_proj(x) itself
    assert blocks.child_endings(tiny.model.layers[0], *cache[0]) == {"self_attn": ("self_attn.o_proj", 2),
                                                                      "mlp": ("mlp.down_proj", 0)}
