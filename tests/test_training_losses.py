"""Training maths against hand-derived numbers and the spec's tables: ANI, Wing, the IDI filter,
the AD loss and intra-batch mixed conditioning."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    AD_PAIRS,
    ani_factor,
    ani_latent,
    attention_disentanglement_loss,
    token_mask,
    wing_loss,
)
from training.metrics import exp_mean, exp_score, idi_keep
from training.mixed_conditioning import mixed_rows, replicate, row_noise
from training.models import SD15_SCHEDULER


def sd15_alphas_cumprod():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD15_SCHEDULER).alphas_cumprod  # diffusers' own schedule, not ours


def test_ani_factor_matches_the_spec_table_and_is_capped_at_600():
    table = {0: 0.029, 100: 0.344, 200: 0.572, 300: 0.833, 400: 1.164, 500: 1.618, 600: 2.285}  # spec A2
    abar = sd15_alphas_cumprod()
    got = ani_factor(torch.tensor(list(table)), abar)
    torch.testing.assert_close(got, torch.tensor(list(table.values())), atol=6e-4, rtol=0)
    # constant after R_tmax; uncapped, t = 999 gives the table's 14.61
    assert torch.equal(ani_factor(torch.tensor([601, 800, 999]), abar), torch.full((3,), float(got[-1])))
    assert float(ani_factor(torch.tensor([999]), abar, r_tmax=999)) == pytest.approx(14.61, abs=6e-3)


def test_ani_latent_is_z0_plus_f_times_the_noise_error():
    abar = sd15_alphas_cumprod()
    z0, noise, predicted = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 0.5)
    out = ani_latent(z0, noise, predicted, torch.tensor([0, 900]), abar)
    # f(0) = sqrt(beta_0 / (1 - beta_0)) with beta_0 = 0.00085; t = 900 takes f(600) = 2.285
    assert float(out[0]) == pytest.approx(0.5 * math.sqrt(0.00085 / (1 - 0.00085)), rel=1e-4)  # float32 schedule
    assert float(out[1]) == pytest.approx(0.5 * 2.285, abs=1e-3)
    # with the exact noise, ANI returns the ground-truth latent
    assert torch.equal(ani_latent(z0 + 3, noise, noise, torch.tensor([0, 900]), abar), z0 + 3)


def test_wing_loss_on_both_sides_of_w_and_continuous_at_w():
    w = 10 / 256
    zero = torch.zeros(1, 1, 2)
    # |x| = 1/256 < w: w ln(1 + 0.5); |x| = 20/256 > w: |x| - (w - w ln 6)
    inside = wing_loss(torch.tensor([[[1 / 256, -1 / 256]]]), zero)
    assert float(inside) == pytest.approx(0.0390625 * 0.4054651, rel=1e-5)
    outside = wing_loss(torch.tensor([[[20 / 256, 0.0]]]), zero)
    assert float(outside) == pytest.approx((0.078125 + 0.0390625 * 1.7917595 - 0.0390625 + 0.0) / 2, rel=1e-5)
    below, above = (float(wing_loss(torch.tensor([[[w + d, w + d]]], dtype=torch.float64), zero.double()))
                    for d in (-1e-9, 1e-9))
    assert below == pytest.approx(above, abs=1e-8) and below == pytest.approx(w * math.log(6), rel=1e-6)


def test_wing_width_and_epsilon_the_ica_stage_uses_are_10_and_2_pixels_of_256():
    from training.emojidiff_config import EMOJIDIFF_DEFAULTS

    # the values the stage passes (emojidiff.wing_width / wing_epsilon) and wing_loss's own defaults
    width, epsilon = EMOJIDIFF_DEFAULTS["wing_width"], EMOJIDIFF_DEFAULTS["wing_epsilon"]
    assert (width, epsilon) == (10 / 256, 2 / 256)
    zero = torch.zeros(1, 1, 2, dtype=torch.float64)
    one_pixel = torch.full((1, 1, 2), 1 / 256, dtype=torch.float64)
    # |x| = 1/256 < w: (10/256) ln(1 + (1/256) / (2/256)) = 0.0390625 ln 1.5; eps = 0.2/256 would give ln 6
    expected = 0.0390625 * 0.4054651081
    assert float(wing_loss(one_pixel, zero, width, epsilon)) == pytest.approx(expected, rel=1e-9)
    assert float(wing_loss(one_pixel, zero)) == pytest.approx(expected, rel=1e-9)


def test_idi_filter_keeps_within_both_thresholds_and_drops_either_above():
    assert idi_keep(0.05, 0.18) and idi_keep(0.0, 0.0) and idi_keep(0.049, 0.179)
    assert not idi_keep(0.0501, 0.1) and not idi_keep(0.01, 0.1801) and not idi_keep(0.2, 0.5)
    assert not idi_keep(float("nan"), 0.1)
    reference, generated = torch.zeros(52).numpy(), torch.full((52,), 0.1).numpy()
    assert exp_score(reference, generated)[0] == pytest.approx(5.2) and exp_mean(reference, generated)[0] == pytest.approx(0.1)


def rows(vectors):
    return torch.tensor(vectors, dtype=torch.float32)


def test_ad_loss_on_hand_built_rows():
    s = 1 / math.sqrt(2)
    conditions = ["ID", "ID+LMK", "ID+EMO", "ID+LMK+EMO"]
    # 4 rows x 2 tokens x 2 channels
    output = rows([[[1, 0], [1, 0]], [[1, 0], [0, 1]], [[-1, 0], [1, 1]], [[1, 1], [0, -1]]])
    # per-token cosines of the 5 pairs, by hand: token 0 and token 1 (negative ones are cut by ReLU)
    token0 = [1, 0, s, 0, s]
    token1 = [0, s, 0, s, 0]
    groups = torch.zeros(4, dtype=torch.long)
    full = torch.ones(4, 2)
    got = attention_disentanglement_loss([output], conditions, groups, [full])
    assert float(got) == pytest.approx(sum(a + b for a, b in zip(token0, token1, strict=True)) / 2, rel=1e-6)
    only_first = torch.tensor([[1.0, 0.0]] * 4)
    assert float(attention_disentanglement_loss([output], conditions, groups, [only_first])) == pytest.approx(sum(token0), rel=1e-6)
    summed = attention_disentanglement_loss([output], conditions, groups, [full], token_reduction="sum")
    assert float(summed) == pytest.approx(sum(token0) + sum(token1), rel=1e-6)
    averaged = attention_disentanglement_loss([output], conditions, groups, [full], pair_reduction="mean")
    assert float(averaged) == pytest.approx(float(got) / 5, rel=1e-6)
    # mean over layers: a second layer whose pair cosines are all <= 0 halves it
    orthogonal = rows([[[1, 0], [1, 0]], [[0, 1], [0, 1]], [[-1, 0], [-1, 0]], [[0, -1], [0, -1]]])
    two_layers = attention_disentanglement_loss([output, orthogonal], conditions, groups, [full, full])
    assert float(two_layers) == pytest.approx(float(got) / 2, rel=1e-6)


def test_ad_loss_only_the_five_pairs_within_an_example():
    same = rows([[[1, 2], [3, 1]], [[1, 2], [3, 1]]])
    mask = torch.ones(2, 2)
    assert len(AD_PAIRS) == 5 and ("ID+EMO", "ID+LMK+EMO") not in AD_PAIRS
    # the sixth pair is not in the loss, even for identical rows
    assert float(attention_disentanglement_loss([same], ["ID+EMO", "ID+LMK+EMO"], torch.tensor([0, 0]), [mask])) == 0.0
    # rows of different examples are never paired; rows of one condition neither
    assert float(attention_disentanglement_loss([same], ["ID", "ID+LMK"], torch.tensor([0, 1]), [mask])) == 0.0
    assert float(attention_disentanglement_loss([same], ["ID", "ID"], torch.tensor([0, 0]), [mask])) == 0.0
    assert float(attention_disentanglement_loss([same], ["ID", "ID+LMK"], torch.tensor([0, 0]), [mask])) == pytest.approx(1.0)


def test_ad_loss_gradients_reach_both_rows():
    output = (torch.rand(2, 16, 8, generator=torch.Generator().manual_seed(0)) + 0.1).requires_grad_(True)
    loss = attention_disentanglement_loss([output], ["ID", "ID+EMO"], torch.tensor([0, 0]), [torch.ones(2, 16)])
    loss.backward()
    assert output.grad[0].abs().sum() > 0 and output.grad[1].abs().sum() > 0


def test_token_mask_resizes_with_nearest():
    mask = torch.zeros(1, 8, 8)
    mask[:, :4, :4] = 1  # top-left quarter
    assert token_mask(mask, 4).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="square"):
        token_mask(mask, 6)


def test_mixed_rows_replicate_examples_and_draw_the_four_combos_uniformly():
    generator = torch.Generator().manual_seed(0)
    small = mixed_rows(2, 4, generator)
    assert small.source.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    table = {"ID": [0, 0], "ID+LMK": [1, 0], "ID+EMO": [0, 1], "ID+LMK+EMO": [1, 1]}
    assert [table[c] for c in small.conditions] == small.alphas.tolist()
    many = mixed_rows(1000, 8, generator)
    for name in table:
        assert many.conditions.count(name) / 8000 == pytest.approx(0.25, abs=0.02)
    batch = replicate({"id": torch.tensor([[1.0], [2.0]]), "key": ["a", "b"], "size": 3}, small)
    assert batch["id"].flatten().tolist() == [1, 1, 1, 1, 2, 2, 2, 2] and batch["key"] == ["a"] * 4 + ["b"] * 4
    noise, t = row_noise((3,), small, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(noise[0], noise[3]) and not torch.equal(noise[0], noise[4]) and t[0] == t[3]
    noise, t = row_noise((3,), small, 1000, torch.Generator().manual_seed(1), shared_noise=False)
    assert not torch.equal(noise[0], noise[1])


def test_insightface_swapper_says_which_file_it_needs(tmp_path):
    from training.face_swap import InsightfaceSwapper

    with pytest.raises(FileNotFoundError, match="inswapper_128.onnx"):
        InsightfaceSwapper(tmp_path, analyzer=None)
