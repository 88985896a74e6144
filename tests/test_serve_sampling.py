"""Per-request sampling parameters, stop strings held back while streaming, chat prompts, and the API's
answers while shutting down (in-process, FastAPI's TestClient).

Oracles: hand-written expectations; transformers' rendering rules for chat templates (sandboxed Jinja,
`add_generation_prompt`, `bos_token`).
"""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from latentattn.checkpoint import load_checkpoint
from latentattn.serve.api import ServedModel, create_app
from latentattn.serve.chat import chat_prompt, plain_prompt
from latentattn.serve.engine import Engine
from latentattn.serve.sampling import SamplingParams, find_stop, held_back
from latentattn.tokens import SpecialTokens


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1"),
        ({"temperature": -0.5}, r"temperature must be 0 \(greedy\)"),
        ({"top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
        ({"top_k": -3}, "top_k must be positive"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"seed": -1}, r"seed must lie in \[0, 2\*\*63\)"),
        ({"stop": ("",)}, "stop must be at most 4 non-empty strings"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop must be at most 4 non-empty strings"),
    ],
)
def test_bad_sampling_parameters_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_no_top_k_or_top_p_spellings_and_seeded_generators():
    params = SamplingParams(top_k=-1, top_p=1, seed=7)
    assert params.config.top_k is None and params.config.top_p is None
    assert torch.equal(
        torch.rand(4, generator=params.generator()), torch.rand(4, generator=params.generator())
    )


def test_stop_strings_are_found_and_their_beginnings_held_back():
    assert find_stop("hello world", ("wor", "lo")) == 3 and find_stop("abc", ("x",)) is None
    assert held_back("answer: EN", ("END",)) == 2  # "EN" may become "END"
    assert held_back("answer: E", ("END", "E!")) == 1
    assert held_back("answer", ("END",)) == 0


def test_chat_prompts_use_the_checkpoint_template_or_the_plain_one(served_checkpoint):
    loaded = load_checkpoint(served_checkpoint)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert plain_prompt(messages) == "system: be brief\nuser: hi\nassistant:"
    plain = chat_prompt(messages, loaded.tokens, loaded.tokenizer)
    assert plain[0] == loaded.tokens.bos_id
    assert loaded.tokenizer.decode(plain[1:]) == plain_prompt(messages)
    template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokens = SpecialTokens(bos_id=loaded.tokens.bos_id, eos_ids=loaded.tokens.eos_ids, chat_template=template)
    ids = chat_prompt(messages, tokens, loaded.tokenizer)
    assert (
        ids
        == loaded.tokenizer.encode(
            f"{loaded.tokenizer.id_to_token(tokens.bos_id)}<system>be brief\n<user>hi\n<assistant>",
            add_special_tokens=False,
        ).ids
    )
    broken = SpecialTokens(
        bos_id=None, eos_ids=(), add_bos=False, chat_template="{{ raise_exception('no system') }}"
    )
    with pytest.raises(ValueError, match="no system"):
        chat_prompt(messages, broken, loaded.tokenizer)


def test_shutting_down_answers_503_and_health_turns_unhealthy(served_checkpoint):
    loaded = load_checkpoint(served_checkpoint)
    engine = Engine(loaded.model, loaded.model.new_paged_cache(num_blocks=16, block_size=4))
    app = create_app(engine, ServedModel("m", loaded.tokenizer, loaded.tokens))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        engine.shutdown(grace_seconds=0)
        refused = client.post("/v1/completions", json={"prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        assert client.get("/health").status_code == 503
