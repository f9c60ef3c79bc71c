"""Partial labels are partial: an organ a case did not label is never taught as background, nor scored.

A liver-only export holds 0 where the spleen is. Plain cross entropy and Dice would push the spleen's probability down
there; the masked losses (hsam.training.losses) treat "background" of such a case as "background or an unknown organ".
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hsam.training.data import Volume, VolumeSlices, unknown_organs_of_case
from hsam.training.loader import TrainingSlices
from hsam.training.losses import ce_loss, dice_loss, hsam_loss
from hsam.training.validate import mean_dice

SPLEEN, LIVER = 1, 5


def _scene(batch: int = 2, size: int = 8, classes: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets with liver in a square and background elsewhere; logits that are right everywhere (background high)."""
    target = torch.zeros(batch, size, size, dtype=torch.int64)
    target[:, 2:5, 2:5] = LIVER
    logits = torch.full((batch, classes, size, size), -2.0)
    logits[:, 0] = 3.0
    logits[:, LIVER][target == LIVER] = 4.0
    logits[:, 0][target == LIVER] = -2.0
    return logits, target


def _spleen_where_background(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The same logits with background's and spleen's swapped on part of the background: the model 'sees a spleen'
    that the partial labels cannot confirm or deny."""
    moved = logits.clone()
    region = torch.zeros_like(target, dtype=torch.bool)
    region[:, 5:, 5:] = True
    region &= target == 0
    background, spleen = moved[:, 0].clone(), moved[:, SPLEEN].clone()
    moved[:, 0] = torch.where(region, spleen, background)
    moved[:, SPLEEN] = torch.where(region, background, spleen)
    return moved


def test_no_unknown_organ_gives_exactly_the_plain_losses():
    logits, target = _scene()
    logits = logits + torch.randn_like(logits)
    none = torch.zeros(2, dtype=torch.int64)
    torch.testing.assert_close(ce_loss(logits, target, unknown=none), F.cross_entropy(logits, target))
    torch.testing.assert_close(dice_loss(logits, target, unknown=none), dice_loss(logits, target))


def test_an_unknown_organ_is_never_taught_as_background():
    logits, target = _scene()
    seen_spleen = _spleen_where_background(logits, target)
    spleen_unknown = torch.full((2,), 1 << SPLEEN, dtype=torch.int64)
    for loss in (ce_loss, dice_loss):
        plain_right, plain_spleen = loss(logits, target), loss(seen_spleen, target)
        assert plain_spleen > plain_right + 0.005, f"{loss.__name__}: plain loss punishes the unconfirmed spleen"
        masked_right = loss(logits, target, unknown=spleen_unknown)
        masked_spleen = loss(seen_spleen, target, unknown=spleen_unknown)
        torch.testing.assert_close(masked_spleen, masked_right, atol=1e-5, rtol=1e-5)


def test_the_masked_cross_entropy_is_the_marginal_likelihood():
    """Background voxel: -log(p_background + p_spleen); liver voxel: -log(p_liver), averaged over all voxels."""
    torch.manual_seed(0)
    logits = torch.randn(1, 9, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.int64)
    target[0, 0, :2] = LIVER
    p = torch.softmax(logits, dim=1)[0]
    expected = torch.where(target[0] == 0, -torch.log(p[0] + p[SPLEEN]), -torch.log(p[LIVER])).mean()
    torch.testing.assert_close(ce_loss(logits, target, unknown=torch.tensor([1 << SPLEEN])), expected)


def test_a_labelled_case_in_the_same_batch_still_teaches_background():
    """Masks are per sample: sample 0 did not label the spleen, sample 1 did (its 0 really means background)."""
    logits, target = _scene()
    logits.requires_grad_(True)
    seen_spleen = _spleen_where_background(logits.detach(), target).requires_grad_(True)
    only_first = torch.tensor([1 << SPLEEN, 0])
    parts = hsam_loss(seen_spleen, seen_spleen, target, target, 0, unknown=only_first)
    parts.total.backward()
    spleen_push = seen_spleen.grad[:, SPLEEN, 5:, 5:].sum(dim=(1, 2))
    assert spleen_push[1] > 1e-3, "the labelled sample lowers the spleen where its label says background"
    assert abs(spleen_push[0]) < spleen_push[1] / 10, "the partial sample barely moves it (only through Dice sums)"


def test_cases_say_which_organs_they_did_not_label():
    assert unknown_organs_of_case({"organs": {"liver": "labelled", "spleen": "unknown"}}) == {SPLEEN}
    # an export from before the "organs" field: organs without an exported segment are unknown
    legacy = {"segments": {"exported": {"liver": "liver", "aorta": "aorta"}, "ignored": []}}
    assert unknown_organs_of_case(legacy) == frozenset({1, 2, 3, 4, 6, 8})
    assert unknown_organs_of_case({}) == frozenset()


def test_training_samples_carry_their_volumes_unknown_organs():
    image = np.zeros((2, 16, 16), dtype=np.float32)
    partial = Volume("partial", image, np.zeros((2, 16, 16), dtype=np.uint8), unknown_organs=frozenset({1, 7}))
    full = Volume("full", image, np.zeros((2, 16, 16), dtype=np.uint8))
    dataset = TrainingSlices(VolumeSlices([partial, full]), img_size=16, low_res=4, augment=None, seed=0)
    assert dataset.unknown_organs([0, 1, 2, 3]).tolist() == [(1 << 1) | (1 << 7)] * 2 + [0, 0]


def test_validation_scores_only_what_the_reference_labelled():
    reference = np.zeros((2, 6, 6), dtype=np.uint8)
    reference[:, :3] = LIVER  # a liver-only reference
    prediction = reference.copy()
    prediction[:, 4:, 4:] = SPLEEN  # the model finds a spleen the reference did not label
    scored = mean_dice([(prediction, reference, frozenset({SPLEEN}))], [SPLEEN, LIVER])
    assert scored["dice"] == 1.0 and math.isnan(scored[f"dice_{SPLEEN}"])
    assert mean_dice([(prediction, reference)], [SPLEEN, LIVER])["dice"] == 0.5, "all labelled: the spleen is wrong"
