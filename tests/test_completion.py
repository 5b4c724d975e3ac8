"""The request code the Python API and the server share: limits, stop strings, messages."""

import pytest

from llamette.completion import StopStrings, chat_messages, make_sampler, max_tokens_for
from llamette.errors import BadParameter


def test_stop_strings_find_the_first_and_hold_back_what_may_start_one():
    stops = StopStrings(("\n\n", "The end", ""))
    assert stops.find("Once upon a time.\n\nThe end", 0) == 17
    assert stops.find("Once upon a time. The end\n\n", 0) == 18
    assert stops.find("no stop here", 0) is None
    assert stops.safe_length("She said: The e") == len("She said: ")
    assert stops.safe_length("A line\n") == len("A line")
    assert stops.safe_length("All shown") == len("All shown")
    assert StopStrings().safe_length("anything") == len("anything")


def test_max_tokens_as_openai_refuses_and_llama_cpp_python_clamps():
    assert max_tokens_for(None, 10, 256, 16) == 16
    assert max_tokens_for(None, 10, 256, None) == 246  # to the end of the context
    assert max_tokens_for(500, 10, 256, None, clamp=True) == 246
    assert max_tokens_for(0, 10, 256, 16, clamp=True) == 16
    with pytest.raises(BadParameter, match="max_tokens: 500 and the prompt's 10 tokens"):
        max_tokens_for(500, 10, 256, 16)
    with pytest.raises(BadParameter, match="max_tokens: must be at least 1"):
        max_tokens_for(0, 10, 256, 16)
    with pytest.raises(BadParameter, match="messages: 256 tokens leave no room") as error:
        max_tokens_for(None, 256, 256, None, prompt_name="messages")
    assert error.value.name == "messages"


def test_greedy_when_temperature_or_top_p_is_zero():
    assert make_sampler(32, temperature=0.0, top_p=0.5).temperature == 0.0
    assert make_sampler(32, temperature=0.7, top_p=0.0).temperature == 0.0
    assert make_sampler(32, temperature=0.7, seed=3).rng_state == make_sampler(32, seed=3).rng_state


@pytest.mark.parametrize(
    "settings, name",
    [({"temperature": -0.1}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
     ({"min_p": 2.0}, "min_p"), ({"repeat_penalty": 0.0}, "repeat_penalty"),
     ({"repeat_last_n": -2}, "repeat_last_n"), ({"presence_penalty": 3.0}, "presence_penalty"),
     ({"frequency_penalty": -3.0}, "frequency_penalty"), ({"logit_bias": {32: 1.0}}, "logit_bias"),
     ({"logit_bias": {3: 101.0}}, "logit_bias")],
)  # fmt: skip
def test_each_bad_setting_is_named(settings, name):
    with pytest.raises(BadParameter, match=f"^{name}: ") as error:
        make_sampler(32, **settings)
    assert error.value.name == name and isinstance(error.value, ValueError)


def test_chat_messages_take_openais_shapes():
    messages = chat_messages([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None},
    ])  # fmt: skip
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Be brief."), ("user", "Hi there"), ("assistant", "")
    ]  # fmt: skip
    with pytest.raises(BadParameter, match=r"^messages\[1\].role: must be system, user or"):
        chat_messages([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(BadParameter, match=r"^messages\[0\].content: must be a string"):
        chat_messages([{"role": "user", "content": 5}])
