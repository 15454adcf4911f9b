"""Any OpenAI-compatible chat endpoint (`POST /v1/chat/completions`): a vLLM or LMDeploy server on a GPU machine,
a hosted API, or `embedkit serve` of a model with a generative head.

Standard library only (urllib): one request per prompt, a batch's requests in parallel threads (servers batch
concurrent requests themselves). Every failure is one line naming the URL: unreachable, an HTTP error with the
start of its body, a timeout, a reply that is not a chat completion. The API key is sent, never recorded.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from embedkit.synth.generators.base import GenerationSettings, GeneratorError, QueryGenerator

_BODY_CHARS = 200  # of an error reply, in the one-line message


def endpoint_urls(api_base: str) -> tuple[str, str]:
    """(chat completions URL, models URL) for a base given as `http://host:port`, `.../v1` or the full URL."""
    base = api_base.strip().rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions", base + "/models"


class ChatEndpointGenerator(QueryGenerator):
    def __init__(self, api_base: str, *, model: str | None, api_key: str | None, settings: GenerationSettings,
                 timeout_s: float = 60.0) -> None:
        self.settings = settings
        self.api_base = api_base
        self.chat_url, self.models_url = endpoint_urls(api_base)
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.served_model: str | None = None
        # Asking for the model list first checks the endpoint before any document is read for generation.
        self.model = model or self._first_model()

    def _request(self, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            text = " ".join(exc.read().decode("utf-8", "replace").split())[:_BODY_CHARS]
            raise GeneratorError(f"{url} answered HTTP {exc.code} ({exc.reason}): {text}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                raise GeneratorError(f"no answer from {url} within {self.timeout_s:g} s (--timeout)") from None
            raise GeneratorError(f"cannot reach {url} ({exc.reason}); is the server running?") from None
        except (socket.timeout, TimeoutError):
            raise GeneratorError(f"no answer from {url} within {self.timeout_s:g} s (--timeout)") from None
        except OSError as exc:  # connection reset while reading, ...
            raise GeneratorError(f"cannot read the answer of {url} ({exc})") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise GeneratorError(f"{url} answered with something that is not JSON: "
                                 f"{raw[:_BODY_CHARS].decode('utf-8', 'replace')!r}") from None
        if not isinstance(reply, dict):
            raise GeneratorError(f"{url} answered with JSON that is not an object")
        return reply

    def _first_model(self) -> str:
        reply = self._request(self.models_url)
        models = [m.get("id") for m in reply.get("data") or [] if isinstance(m, dict) and m.get("id")]
        if not models:
            raise GeneratorError(f"{self.models_url} lists no model; name one with --api-model")
        return str(models[0])

    def _one(self, prompt: str, seed: int) -> str:
        s = self.settings
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": seed}
        reply = self._request(self.chat_url, body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise GeneratorError(f"{self.chat_url} answered without choices[0].message.content: "
                                 f"{json.dumps(reply)[:_BODY_CHARS]}") from None
        self.served_model = reply.get("model") or self.served_model
        return content if isinstance(content, str) else ""

    def generate(self, prompts: Sequence[str], *, seed: int) -> list[str]:
        if not prompts:
            return []
        # Seed i + seed per prompt: servers that honour `seed` then give each prompt its own reproducible stream.
        with ThreadPoolExecutor(max_workers=max(1, min(self.settings.batch_size, len(prompts)))) as pool:
            return list(pool.map(self._one, prompts, [seed + i for i in range(len(prompts))]))

    def describe(self) -> dict[str, Any]:
        return {"engine": "api", "api_base": self.api_base, "model": self.model, "served_model": self.served_model,
                "sha256": None, "settings": self.settings.to_dict()}
