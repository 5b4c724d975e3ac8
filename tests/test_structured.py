"""Structured output: every answer a JSON schema asks for parses and validates (jsonschema),
sampled at temperature 1.0 from the bundled model, whose stories know nothing of JSON."""

import json
from pathlib import Path

import pytest

import llamette
from conftest import serving
from llamette.server import ServedModel
from llamette.structured import schema_of

pytest.importorskip("llguidance", reason="llguidance makes the masks (a dependency)")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test dependency")

BUNDLED = Path(llamette.__file__).parent / "bundled"
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "weight": {"type": "number"},
        "kind": {"enum": ["dog", "cat", "bird"]},
        "friends": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {
                "town": {"type": "string", "maxLength": 16},
                "garden": {"type": "boolean"},
            },
            "required": ["town", "garden"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "kind", "home"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "pet", "schema": PET, "strict": True},
}


@pytest.fixture(scope="module")
def llm() -> llamette.Llama:
    return llamette.Llama(str(BUNDLED / "model.bin"), verbose=False)


def test_fifty_seeded_answers_all_validate(llm):
    answers = []
    for seed in range(50):
        answer = llm.create_chat_completion(
            [{"role": "user", "content": "Tell me about your pet."}], temperature=1.0, seed=seed,
            max_tokens=200, response_format=RESPONSE_FORMAT,
        )  # fmt: skip
        assert answer["choices"][0]["finish_reason"] == "stop"
        answers.append(json.loads(answer["choices"][0]["message"]["content"]))
        jsonschema.validate(answers[-1], PET)
    assert len({json.dumps(a) for a in answers}) > 40  # sampled, not one answer forced


def test_json_object_answers_are_objects(llm):
    for seed in range(5):
        text = llm("Once upon a time", max_tokens=120, temperature=1.0, seed=seed,
                   response_format={"type": "json_object", "schema": {
                       "type": "object", "properties": {"story": {"type": "string", "maxLength": 40}},
                       "required": ["story"], "additionalProperties": False}})["choices"][0]["text"]  # fmt: skip
        assert isinstance(json.loads(text)["story"], str)


def test_without_a_format_the_answer_is_the_same_as_before(llm):
    free = llm("Once upon a time", max_tokens=30, temperature=0.8, seed=4)
    text = llm(
        "Once upon a time", max_tokens=30, temperature=0.8, seed=4, response_format={"type": "text"}
    )
    assert free["choices"][0]["text"] == text["choices"][0]["text"]


@pytest.mark.parametrize(
    "response_format, where",
    [({"type": "xml"}, "response_format.type"), ("json", "response_format"),
     ({"type": "json_schema", "json_schema": {"schema": 3}}, "response_format.json_schema"),
     ({"type": "json_schema", "json_schema": {"schema": {"type": "object", "minProperties": "x"}}},
      "response_format")],
)  # fmt: skip
def test_bad_formats_are_named(llm, response_format, where):
    with pytest.raises(ValueError, match=f"^{where}"):
        llm("x", response_format=response_format)


def test_the_server_answers_json_schema_requests_of_several_choices():
    openai = pytest.importorskip("openai", reason="openai is a test dependency")
    served = ServedModel.load(str(BUNDLED / "model.bin"), max_batch=8, name="stories")
    with serving(served) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="stories", messages=[{"role": "user", "content": "Describe a pet."}], n=4,
            temperature=1.0, seed=9, max_tokens=200, response_format=RESPONSE_FORMAT,
        )  # fmt: skip
        crowd = client.completions.create(model="stories", prompt="Once", max_tokens=40)
        bad = client.with_options(max_retries=0).chat.completions.with_raw_response
        with pytest.raises(openai.BadRequestError, match="response_format"):
            bad.create(model="stories", messages=[{"role": "user", "content": "x"}],
                       response_format={"type": "yaml"})  # fmt: skip
    for choice in answer.choices:
        jsonschema.validate(json.loads(choice.message.content), PET)
    assert crowd.usage.completion_tokens == 40


def test_schema_of_reads_openais_and_llama_cpp_pythons_shapes():
    assert schema_of(None) is None and schema_of({"type": "text"}) is None
    assert schema_of({"type": "json_object"}) == {"type": "object"}
    assert schema_of({"type": "json_object", "schema": PET}) == PET
    assert schema_of(RESPONSE_FORMAT) == PET
