"""LocalLeap's anchor + neighbourhood rule on hand-worked logits (reference/samplers.md §LocalLeap)."""

import functools

import jax
import numpy as np
import pytest

from dllm.decoding import SpecialIds
from samplers.local_leap import LocalLeap
from tests import helpers
from tests.helpers import logits_of, marks, top

M = 5
make_state = functools.partial(helpers.make_state, special=SpecialIds(mask=5, eos=4, eot=4, pad=0))


def test_anchors_and_their_neighbours_at_the_relaxed_bar():
    """tau 0.9, tau_relaxed 0.75, radius 2; one block of 8."""
    state = make_state([[M] * 8, [M] * 8, [M] * 8, [1, M, M, M, M, M, M, M]], 0, 8, block_length=8)
    rows = [
        [.95, .8, .8, .8, .6, .8, .5, .5],     # anchor 0: 1 and 2 pass at 0.75; 3 and 5 are too far
        [.8, .85, .5, .5, .5, .5, .5, .5],     # no anchor: only the most confident
        [.95, .5, .5, .76, .5, .76, .5, .92],  # anchors 0 and 7: 5 is within 2 of 7, 3 is not
        [.99, .95, .8, .7, .5, .5, .5, .5],    # 0 is committed already: anchor 1, 2 passes, 3 (0.7) fails
    ]
    sampler = LocalLeap(tau=0.9, tau_relaxed=0.75, radius=2)
    commit, _ = jax.jit(sampler.step)(logits_of([[top(c) for c in row] for row in rows]), state, sampler.init(state))
    np.testing.assert_array_equal(np.asarray(commit.commit), marks("111.....", ".1......", "1....1.1", ".11....."))


@pytest.mark.parametrize("fields, message", [
    (dict(tau_relaxed=0.95), r"LocalLeap.tau_relaxed=0.95"),
    (dict(radius=-1), r"LocalLeap.radius=-1: must be an int >= 0"),
])
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        LocalLeap(**fields)
