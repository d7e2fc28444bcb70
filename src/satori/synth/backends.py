"""Where the agents' text comes from: a local Hugging Face model or an OpenAI-compatible
chat-completions endpoint.

* ``hf``: any local causal LM folder, sampled through :func:`satori.rollout.generate`
  (batched, seeded, special tokens kept).
* ``openai``: ``POST {base_url}/chat/completions`` through httpx with a bounded thread pool
  (``concurrency``), a per-request ``timeout``, and retries with exponential back-off
  (``backoff * 2**attempt`` seconds, or the server's ``Retry-After``) on time-outs,
  connection errors, 429, 5xx and 200 answers that are not a chat completion (garbage).
  Other 4xx answers fail at once. A request that still fails after ``max_retries``
  retries comes back as a :class:`RequestFailed` value, so a caller can report it and go
  on with other work. :func:`probe` checks, before any work,
  that ``GET {base_url}/models`` answers.

A generator continues a partial solution either as a trailing assistant message with
``continue_final_message`` (vLLM's extension; ``continue_mode: prefix``), or by asking in
the user message to continue the given partial solution (``continue_mode: instruction``);
the returned text is the continuation only.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import httpx

from satori.errors import SatoriError

RETRY_STATUS = {408, 409, 425, 429}
CONTINUE_INSTRUCTION = (
    "{body}\n\nHere is the beginning of a solution. Continue it from where it stops, in the "
    "same format, and write only the remaining steps.\n\n{prefix}"
)


@dataclass
class Completion:
    """One generated text; ``truncated`` when it stopped at the length limit."""

    text: str
    truncated: bool


@dataclass
class RequestFailed:
    """A request that failed for good (after retries); ``error`` is a one-line reason."""

    error: str


@dataclass
class OpenAIClient:
    """Connection settings of an OpenAI-compatible endpoint plus its httpx client."""

    base_url: str
    model: str
    http: httpx.Client
    timeout: float
    max_retries: int
    backoff: float
    concurrency: int
    continue_mode: str = "prefix"
    role: str = "agent"


def api_key(env_name: str, role: str) -> str | None:
    """The API key from the environment variable named ``env_name`` ('' = no key)."""
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise SatoriError(f"{role}: environment variable {env_name} (api_key_env) is not set; "
                          "export the API key or set api_key_env to ''")
    return value


def make_client(base_url: str, model: str, api_key_env: str, timeout: float, max_retries: int,
                backoff: float, concurrency: int, continue_mode: str = "prefix", role: str = "agent") -> OpenAIClient:
    """An :class:`OpenAIClient`; raises SatoriError for a missing key variable."""
    if not base_url:
        raise SatoriError(f"{role}: backend openai needs base_url (e.g. http://localhost:8000/v1)")
    if not model:
        raise SatoriError(f"{role}: backend openai needs model (the served model's name)")
    key = api_key(api_key_env, role)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    http = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout,
                        limits=httpx.Limits(max_connections=max(1, concurrency)))
    return OpenAIClient(base_url.rstrip("/"), model, http, timeout, max_retries, backoff, concurrency,
                        continue_mode, role)


def probe(client: OpenAIClient) -> None:
    """Fail fast (SatoriError) unless ``GET {base_url}/models`` answers 200 within the timeout."""
    url = f"{client.base_url}/models"
    try:
        r = client.http.get("models", timeout=min(client.timeout, 10.0))
    except httpx.HTTPError as e:
        raise SatoriError(f"{client.role}: endpoint {url} is unreachable ({type(e).__name__}: {e})") from None
    if r.status_code in (401, 403):
        raise SatoriError(f"{client.role}: endpoint {url} refused the API key (HTTP {r.status_code})")
    if r.status_code != 200:
        raise SatoriError(f"{client.role}: endpoint {url} answered HTTP {r.status_code}")


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after")
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def chat(client: OpenAIClient, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
         seed: int | None = None, extra: dict[str, Any] | None = None) -> Completion | RequestFailed:
    """One chat completion, with retries and back-off; never raises for network errors."""
    body: dict[str, Any] = {"model": client.model, "messages": messages, "max_tokens": max_tokens,
                            "temperature": temperature, "n": 1}
    if seed is not None:
        body["seed"] = seed
    body.update(extra or {})
    error = "no attempt"
    for attempt in range(client.max_retries + 1):
        wait = client.backoff * (2 ** attempt)
        try:
            r = client.http.post("chat/completions", json=body)
        except httpx.TimeoutException:
            error = f"timed out after {client.timeout:g} s"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        else:
            if r.status_code == 200:
                parsed = _parse_completion(r)
                if isinstance(parsed, Completion):
                    return parsed
                error = parsed.error  # garbage from a proxy or an overloaded server: try again
            else:
                error = f"HTTP {r.status_code}: {r.text[:200].strip()}"
            if 200 < r.status_code < 500 and r.status_code not in RETRY_STATUS:
                return RequestFailed(f"{client.role}: {client.base_url}/chat/completions: {error}")
            wait = _retry_after(r) or wait
        if attempt < client.max_retries:
            time.sleep(wait)
    return RequestFailed(f"{client.role}: {client.base_url}/chat/completions failed after "
                         f"{client.max_retries + 1} attempts: {error}")


def _parse_completion(r: httpx.Response) -> Completion | RequestFailed:
    try:
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] or ""
        if not isinstance(text, str):
            raise TypeError("content is not text")
        finish = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return RequestFailed(f"malformed chat-completions answer: {r.text[:200]!r}")
    return Completion(text, finish == "length")


def chat_many(client: OpenAIClient, requests: Sequence[dict[str, Any]]) -> list[Completion | RequestFailed]:
    """:func:`chat` over many requests (keyword dicts), at most ``concurrency`` at a time,
    results in request order."""
    if not requests:
        return []
    with ThreadPoolExecutor(max(1, client.concurrency)) as pool:
        return list(pool.map(lambda kw: chat(client, **kw), requests))


def generator_messages(body: str, prefix: str, continue_mode: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Messages (and extra request fields) asking a chat model to solve ``body`` or to
    continue the partial solution ``prefix``."""
    if not prefix:
        return [{"role": "user", "content": body}], {}
    if continue_mode == "prefix":
        return ([{"role": "user", "content": body}, {"role": "assistant", "content": prefix}],
                {"continue_final_message": True, "add_generation_prompt": False})
    return [{"role": "user", "content": CONTINUE_INSTRUCTION.format(body=body, prefix=prefix)}], {}


# --------------------------------------------------------------------------- hf


def hf_complete(model: Any, tokenizer: Any, prompts: Sequence[str], *, n: int, temperature: float,
                max_new_tokens: int, seed: int, batch_size: int) -> list[list[Completion]]:
    """``n`` completions per prompt from a local causal LM (grouped by prompt)."""
    from satori.rollout import generate

    if not prompts:
        return []
    samples = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
                       n=n, batch_size=batch_size, seed=seed)
    out: list[list[Completion]] = [[] for _ in prompts]
    for s in samples:
        out[s.index].append(Completion(s.text, s.truncated))
    return out
