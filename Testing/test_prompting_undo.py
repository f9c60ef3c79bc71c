"""A prompt session puts back what a change replaced (``hsam serve``'s "undo", the Slicer module's Undo), so a later
propagation never starts from, or stops at, an undone prompt."""

from __future__ import annotations

import numpy as np
from torch import nn

from hsam.prompting.embedding import SliceEmbeddings
from hsam.prompting.session import USER, PromptSession, SlicePrompt


def _session() -> PromptSession:
    return PromptSession(SliceEmbeddings(np.zeros((6, 16, 16), dtype=np.int16), nn.Identity()), decoder=None)


def _store(session: PromptSession, organ: int, z: int, side: int) -> None:
    logits = np.full((16, 16), -1.0, dtype=np.float32)
    logits[:side, :side] = 1.0
    session.store(organ, z, SlicePrompt(box=(0.0, 0.0, side, side), source=USER), logits, 0.9)


def test_undo_puts_back_the_latest_change_only():
    session = _session()
    session.begin(1)
    _store(session, 5, 2, 4)
    session.begin(2)
    _store(session, 5, 2, 8)  # a new box on the same slice
    _store(session, 5, 3, 8)
    assert session.undo() == [(5, 2), (5, 3)]
    assert session.mask(5, 2).sum() == 16 and not session.is_prompted(5, 3)
    assert session.undo() == [(5, 2)]
    assert not session.mask(5, 2).any() and not session.prompts
    assert session.undo() == []


def test_undo_from_a_step_puts_back_that_change_and_every_later_one():
    session = _session()
    for step, z in ((1, 1), (2, 2), (3, 3)):
        session.begin(step)
        _store(session, 1, z, 4)
    session.begin(4)
    session.clear(1, 1)
    assert not session.mask(1, 1).any()
    assert sorted(session.undo(3)) == [(1, 1), (1, 3)]  # the clear (4) and the prompt of step 3
    assert session.mask(1, 1).any() and session.mask(1, 2).any() and not session.mask(1, 3).any()
    assert session.undo(7) == [], "no change from step 7 on"


def test_changes_without_begin_are_not_recorded():
    session = _session()
    _store(session, 1, 0, 4)  # hsam prompt's plan: nothing to undo
    assert session.history == [] and session.undo() == []
