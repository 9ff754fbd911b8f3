"""A conversation fed ever longer lines re-plans, but never past the model's largest G."""

import pytest
from conftest import shared_path

from selfextend_mlx.app.session import Session, SessionOptions
from selfextend_mlx.errors import InputTooLongError
from selfextend_mlx.loading.load import load


def test_a_growing_conversation_never_plans_past_the_largest_group_size():
    model, tokenizer = load(str(shared_path("models", "stories260K")), selfextend=False)
    limits = model.model_info.limits
    session = Session(model, tokenizer, options=SessionOptions(max_tokens=2))
    seen = []
    line = "Lily and Tom went to the park to play with the ball. "
    for turn in range(8):
        try:
            session.ask(line * (40 * 2**turn), max_tokens=1)
        except InputTooLongError:
            break  # past the largest reach: refused in one line, never a larger G
        seen.append(session.plan.settings.group_size)
    history = list(session.history)
    with pytest.raises(InputTooLongError, match="the largest G"):
        session.ask(line * 1000, max_tokens=1)
    assert session.history == history  # a refused question costs the conversation nothing
    assert seen and max(seen) <= limits.max_group_size
    assert max(seen) > 1  # it did re-plan (plain attention at first)
    assert seen == sorted(seen)  # re-planned upwards, and only as far as the rule allows
    # the turn that needed old turns dropped was still re-planned to a larger G, not refused
    assert len(seen) >= 4 and seen[-1] > seen[-2]
