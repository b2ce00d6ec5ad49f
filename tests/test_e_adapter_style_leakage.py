"""EmojiDiff's style-leakage check (spec E12) on the tests' stand-in models: benchmarks/e_adapter_style_leakage.py.

Random weights know nothing of style, so this checks the mechanism the paper relies on, not its claim about trained
weights: with the expression branch only in SDXL's ``up_blocks.0.attentions.1`` (the E-Adapter's own layer set), a
colour or texture change of the expression picture reaches fewer layers and moves the output less than with the
branch on all 70 layers, yet still moves it (the branch is not simply off)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e_adapter_style_leakage.py"


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("e_adapter_style_leakage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure(seed=0, samples=2)


def test_a_style_change_reaches_only_the_block_and_the_layers_after_it(results):
    # SDXL's 70 cross-attention layers run down (4 + 20), mid (10), up_blocks.0 (3 x 10), up_blocks.1 (3 x 2):
    # everything before up_blocks.0.attentions.1 (44 layers) sees the same inputs whatever the expression picture.
    after = [f"up_blocks.0.attentions.{a}.transformer_blocks.{b}.attn2" for a in (1, 2) for b in range(10)]
    after += [f"up_blocks.1.attentions.{a}.transformer_blocks.{b}.attn2" for a in range(3) for b in range(2)]
    assert results["up_blocks.0.attentions.1"]["moved"] == sorted(after)
    assert results["up_blocks.0.attentions.1"]["layers"] == results["all layers"]["layers"] == 70
    assert results["all layers"]["layers_moved"] == 70


@pytest.mark.parametrize("change", ["colour", "texture"])
def test_a_style_change_moves_the_output_less_with_the_branch_in_one_block(results, change):
    restricted = results["up_blocks.0.attentions.1"]["change"][change]
    everywhere = results["all layers"]["change"][change]
    assert 0 < restricted < everywhere
