"""`embedkit serve` of a model with a generative head: chat completions and embeddings from one server, via the
OpenAI client (tiny Llama trained one SFT step)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedkit.serve.app import ServeSettings, create_app
from embedkit.serve.server import BackgroundServer, load_backends, load_generators


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, tiny_llama_dir) -> Path:
    import yaml

    from embedkit.llm.config import load_llm_recipe
    from embedkit.llm.sft import train_sft

    tmp = tmp_path_factory.mktemp("chat")
    data = tmp / "qa.jsonl"
    data.write_text("".join(json.dumps({"query": f"what is {t}?", "positive": f"{t} is a disease", "focus": t}) + "\n"
                            for t in ("asthma", "flu", "gout", "diabetes")))
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_llama_dir), "max_length": 160},
                                      "data": {"train": str(data)},
                                      "training": {"output_dir": str(tmp / "model"), "batch_size": 4, "max_steps": 1,
                                                   "progress": False}}))
    return Path(train_sft(load_llm_recipe(recipe, mode="sft"))["output_dir"])


@pytest.fixture(scope="module")
def server(chat_folder, st_bert):
    models = [f"chat={chat_folder}", f"bert={st_bert}"]
    backends = load_backends(models)
    generators = load_generators(models, backends)
    assert set(generators) == {"chat"}  # the BERT folder has no generative head
    settings = ServeSettings(max_completion_tokens=64)
    with BackgroundServer(create_app(backends, settings, generators)) as running:
        yield running


def test_openai_client_gets_chat_and_embeddings_from_one_server(server, chat_folder):
    from openai import OpenAI

    from embedkit.llm.generate import load_generator
    from embedkit.models import load_model

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "what is asthma?"}]
    reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=12)
    assert reply.object == "chat.completion" and reply.model == "chat"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # greedy: the server answers what the in-process generator answers
    expected = load_generator(chat_folder).chat(messages, max_new_tokens=12)
    assert choice.message.content == expected.text and reply.usage.completion_tokens == expected.completion_tokens

    vectors = client.embeddings.create(model="chat", input=["what is asthma?"], extra_body={"input_type": "query"})
    local = load_model(chat_folder).encode(["what is asthma?"], kind="query")
    assert np.allclose(np.array(vectors.data[0].embedding), local[0], atol=1e-5)
    listed = {m.id: m for m in client.models.list().data}
    assert listed["chat"].model_extra["chat"] is True and listed["bert"].model_extra["chat"] is False


def test_chat_errors_are_clear_4xx(server):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(model="chat", messages=messages, stream=True)
    with pytest.raises(openai.BadRequestError, match="no generative head"):
        client.chat.completions.create(model="bert", messages=messages)
    with pytest.raises(openai.BadRequestError, match="limit of 64"):
        client.chat.completions.create(model="chat", messages=messages, max_tokens=65)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="chat", messages=[])
