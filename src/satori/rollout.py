"""Sampling from any causal LM, and the log-probabilities of what was sampled.

One place decides how text is generated and scored, so that sampling, evaluation and every
training loop agree on temperature, masking and special tokens:

* :func:`load_model` / :func:`load_tokenizer` open a local Hugging Face checkpoint (the
  testbed model or a real one) with clear errors;
* :func:`generate` samples (or decodes greedily) in memory-bounded, length-sorted batches
  with an explicit generation config: no top-k / top-p / repetition penalty sneaking in
  from a checkpoint's ``generation_config.json``, so the sampling distribution is exactly
  ``softmax(logits / temperature)``, the one :func:`token_logprobs` scores;
* for Llama-layout decoders (Llama, Qwen2: the testbed model and the Qwen2.5-Math family)
  :func:`decode_kv` runs the decoding loop itself over the model's own modules, with a
  preallocated key/value cache and finished rows dropped from the batch as it goes; it
  returns exactly the tokens ``model.generate`` returns (tested) at 1.5–2.4× the speed on
  a CPU (``benchmarks/RESULTS.md``); other architectures use ``model.generate``;
* responses are decoded with special tokens kept (the COAT meta-actions are special
  tokens); only padding and the end-of-sequence token are removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from satori.errors import SatoriError


@dataclass
class Sample:
    """One generated response."""

    prompt: str
    text: str
    prompt_ids: list[int]
    response_ids: list[int]
    truncated: bool  # stopped by the length limit, not by an end-of-sequence token
    index: int = 0  # which prompt it answers
    meta: dict[str, Any] = field(default_factory=dict)
    stop_id: int | None = None  # the end token that stopped it (a model may have several); None if truncated

    def scored_ids(self, eos_id: int) -> list[int]:
        """The tokens a trainer scores: the response, then the end token that was sampled
        (``eos_id`` for a sample made without a record of it); no end token when truncated."""
        if self.truncated:
            return list(self.response_ids)
        return [*self.response_ids, eos_id if self.stop_id is None else self.stop_id]


def _check_model_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise SatoriError(f"model path does not exist: {p}")
    if not (p / "config.json").is_file():
        raise SatoriError(f"{p}: not a Hugging Face model folder (no config.json)")
    return p


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer from a local folder, set up for batched generation (left padding)."""
    from transformers import AutoTokenizer

    p = _check_model_path(path)
    if not any((p / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                 "vocab.json", "vocab.txt")):
        raise SatoriError(f"{p}: no tokenizer files (tokenizer.json / tokenizer_config.json) beside the weights; "
                          "copy them from the model it was trained from")
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise SatoriError(f"{p}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(path: str | Path, dtype: str = "float32", value_head: bool = False) -> Any:
    """A causal LM from a local folder, in eval mode."""
    from transformers import AutoModelForCausalLM

    p = _check_model_path(path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise SatoriError(f"unknown dtype {dtype!r} (float32, bfloat16 or float16)")
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype, local_files_only=True)
    model.eval()
    return model


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a response: the tokenizer's and the generation config's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise SatoriError("the tokenizer has no end-of-sequence token; set tokenizer.eos_token")
    return sorted(ids)


def _batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int, new_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length; each batch holds at most
    ``batch_size`` rows and at most ``max_batch_tokens`` (prompt + new) tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, cur_len = [], [], 0
    for i in order:
        row = lengths[i] + new_tokens
        longest = max(cur_len, row)
        if cur and (len(cur) >= batch_size or longest * (len(cur) + 1) > max_batch_tokens):
            batches.append(cur)
            cur, longest = [], row
        cur.append(i)
        cur_len = longest
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    n: int = 1,
    batch_size: int = 64,
    max_batch_tokens: int = 65536,
    seed: int = 0,
    prompt_offset: int = 0,
    progress: bool = False,
    desc: str = "generate",
    engine: str = "auto",
) -> list[Sample]:
    """Sample ``n`` responses for each prompt (greedy when ``temperature == 0``).

    Returns ``len(prompts) * n`` samples ordered by prompt, then by sample. Sampling is
    *batch-invariant*: sample ``j`` of prompt ``i`` draws its randomness from its own
    generator seeded by ``(seed, prompt_offset + i, j)`` (Gumbel-max over
    ``logits / temperature``, exactly a draw from ``softmax(logits / temperature)``), so the
    same seed gives the same samples whatever the batch size or the number of processes
    (a process passes the global index of its first prompt as ``prompt_offset``).

    ``engine``: ``"kv"`` (:func:`decode_kv`), ``"hf"`` (``model.generate``) or ``"auto"``
    (``"kv"`` when the architecture is supported).
    """
    if engine not in ("auto", "kv", "hf"):
        raise SatoriError(f"engine must be 'auto', 'kv' or 'hf', got {engine!r}")
    if engine == "kv" and not kv_decode_supported(model):
        raise SatoriError(f"engine 'kv' does not support model type {model.config.model_type!r}; use 'hf'")
    use_kv = engine == "kv" or (engine == "auto" and kv_decode_supported(model))
    if temperature < 0:
        raise SatoriError(f"temperature must be >= 0, got {temperature}")
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise SatoriError("n, max_new_tokens and batch_size must be >= 1")
    from transformers import GenerationConfig

    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0, num_beams=1,
        eos_token_id=stop, pad_token_id=pad_id, bos_token_id=None,
    )
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    flat = [(i, j) for i in range(len(prompts)) for j in range(n)]
    batches = _batches([len(encoded[i]) for i, _ in flat], batch_size, max_batch_tokens, max_new_tokens)
    out: list[Sample | None] = [None] * len(flat)
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(flat), desc=desc, unit="sample", leave=False)
    device = next(model.parameters()).device
    try:
        for batch in batches:
            # each distinct prompt once; ``expand`` maps every batch row to its prompt
            prompt_of = [flat[k][0] for k in batch]
            distinct = list(dict.fromkeys(prompt_of))
            expand = [distinct.index(i) for i in prompt_of] if len(distinct) < len(batch) else None
            rows = [encoded[i] for i in (distinct if use_kv else prompt_of)]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[r, width - len(row):] = 1
            sampler = None
            if temperature > 0:
                sampler = GumbelSampler(temperature, [sample_seed(seed, prompt_offset + flat[k][0], flat[k][1])
                                                      for k in batch])
            if use_kv:
                new = decode_kv(model, ids.to(device), mask.to(device), max_new_tokens, stop, pad_id, sampler,
                                expand=expand)
            else:
                from transformers import LogitsProcessorList

                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                                     logits_processor=LogitsProcessorList([sampler]) if sampler else None)
                new = gen[:, width:].tolist()
            for r, k in enumerate(batch):
                i, j = flat[k]
                resp, stop_id = _cut_at_eos(new[r], set(stop))
                out[k] = Sample(
                    prompt=prompts[i], text=decode(tokenizer, resp), prompt_ids=encoded[i],
                    response_ids=resp, truncated=stop_id is None, index=i, meta={"sample": j}, stop_id=stop_id,
                )
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return [s for s in out if s is not None]


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample's private random stream."""
    return (seed * 1_000_003 + prompt_index * 1_009 + sample_index) % (2**63 - 1)


class GumbelSampler:
    """Logits processor that turns greedy decoding into exact sampling.

    ``argmax(logits / T + Gumbel noise)`` is a draw from ``softmax(logits / T)``; each row
    draws its noise from its own generator, so a sample does not depend on which other rows
    share its batch.
    """

    def __init__(self, temperature: float, seeds: Sequence[int]):
        self.temperature = temperature
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.perturb(scores, range(len(self.generators)))

    def perturb(self, scores: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """``scores / T`` plus Gumbel noise; ``scores[i]`` belongs to the ``rows[i]``-th stream."""
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=self.generators[r]) for r in rows]).to(scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20)))
        return scores.float() / self.temperature + gumbel


#: Architectures whose decoder layers have the Llama layout (``input_layernorm``,
#: ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp``) and full attention.
KV_DECODE_TYPES = ("llama", "qwen2")


def kv_decode_supported(model: Any) -> bool:
    cfg = model.config
    return cfg.model_type in KV_DECODE_TYPES and not getattr(cfg, "use_sliding_window", False)


@torch.no_grad()
def decode_kv(model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop: Sequence[int],
              pad_id: int, sampler: GumbelSampler | None = None,
              expand: Sequence[int] | None = None) -> list[list[int]]:
    """Decode left-padded prompts ``ids`` (``mask`` marks real tokens); greedy, or sampled
    through ``sampler``. Returns the new tokens of each row (padding after its end token),
    the same tokens ``model.generate`` gives.

    ``expand[r]`` names the prompt row that output row ``r`` continues: several samples of
    one prompt share one pass over the prompt (its keys and values are copied, not recomputed).

    The decoder's own modules do all the maths (norms, projections, rotary embedding, MLP);
    this loop only owns the key/value cache, preallocated for the whole answer, and the
    batch: rows that have ended are dropped once a quarter of the batch has ended, so a long
    answer does not keep the whole batch computing.
    """
    inner = model.model
    cfg = model.config
    width = ids.shape[1]
    rows = len(expand) if expand is not None else ids.shape[0]
    total = width + max_new_tokens
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    shape = (cfg.num_hidden_layers, ids.shape[0], cfg.num_key_value_heads, total, head_dim)
    # uninitialised: a position is written (prompt pass, or the step that adds it) before any
    # query can see it, and attention reads only the positions written so far
    keys = torch.empty(shape, dtype=dtype, device=ids.device)
    values = torch.empty(shape, dtype=dtype, device=ids.device)
    valid = torch.zeros(ids.shape[0], total, dtype=torch.bool, device=ids.device)
    valid[:, :width] = mask.bool()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    stop_set = set(stop)

    def forward(tokens: torch.Tensor, pos: torch.Tensor, start: int) -> torch.Tensor:
        b, t = tokens.shape
        end = start + t
        h = inner.embed_tokens(tokens)
        cos, sin = inner.rotary_emb(h, pos)
        # query i (absolute position start + i) sees valid keys up to itself; it always sees
        # itself, so padding queries never meet an all-masked row (no NaN in the cache)
        causal = torch.ones(t, end, dtype=torch.bool, device=tokens.device).tril(start)
        attn_mask = valid[:, None, :end] & causal[None]
        attn_mask[:, torch.arange(t), torch.arange(start, end)] = True
        attn_mask = attn_mask[:, None]
        for li, layer in enumerate(inner.layers):
            q, k, v = _qkv(layer, h, cos, sin, head_dim)
            keys[li, :, :, start:end] = k
            values[li, :, :, start:end] = v
            h = _attend(layer, h, q, keys[li, :, :, :end], values[li, :, :, :end], attn_mask)
        return model.lm_head(inner.norm(h[:, -1]))

    out = [[] for _ in range(rows)]
    active = list(range(rows))  # original row of each current batch row
    alive = [True] * rows
    logits = forward(ids, positions, 0)
    pos = positions[:, -1:]
    if expand is not None:
        pick = torch.tensor(list(expand), device=ids.device)
        keys, values = _take_rows(keys, pick, width), _take_rows(values, pick, width)
        valid, pos, logits = valid[pick], pos[pick], logits[pick]
    for step in range(max_new_tokens):
        picked = (sampler.perturb(logits, active) if sampler is not None else logits).argmax(-1)
        tokens = picked.tolist()
        for r, tok in zip(active, tokens):
            if alive[r]:
                out[r].append(tok)
                alive[r] = tok not in stop_set
        still = [i for i, r in enumerate(active) if alive[r]]
        if not still or step == max_new_tokens - 1:
            break
        valid[:, width + step] = True
        if len(still) <= 0.75 * len(active):
            keep = torch.tensor(still, device=ids.device)
            keys, values = _take_rows(keys, keep, width + step), _take_rows(values, keep, width + step)
            valid, pos, picked = valid[keep], pos[keep], picked[keep]
            active = [active[i] for i in still]
        pos = pos + 1
        logits = forward(picked[:, None], pos, width + step)
    return [row + [pad_id] * (max_new_tokens - len(row)) for row in out]


def _take_rows(cache: torch.Tensor, rows: torch.Tensor, filled: int) -> torch.Tensor:
    """A new ``[layers, len(rows), heads, total, head_dim]`` cache holding ``rows`` of
    ``cache``; only the first ``filled`` positions (the ones written so far) are copied, the
    rest is left uninitialised: every position is written before attention reads it."""
    out = cache.new_empty((cache.shape[0], len(rows), *cache.shape[2:]))
    out[:, :, :, :filled] = cache[:, :, :, :filled].index_select(1, rows)
    return out


def _qkv(layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``[b, heads, t, head_dim]`` of a Llama-layout decoder layer
    for hidden states ``h`` ``[b, t, hidden]`` (rotary embedding applied)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    b, t = h.shape[:2]
    q = attn.q_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
    q, k = _rotate(q, k, cos, sin)
    return q, k, v


def _attend(layer: Any, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """The rest of the layer: attention of ``q`` over ``k`` / ``v`` (``mask`` True = visible),
    output projection and MLP, both residual."""
    b, t = h.shape[:2]
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (the rotate-half form Llama and Qwen2 use)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _cut_at_eos(tokens: list[int], stop: set[int]) -> tuple[list[int], int | None]:
    """The response up to (excluding) the first end token, and that token (None: truncated)."""
    for k, t in enumerate(tokens):
        if t in stop:
            return tokens[:k], t
    return tokens, None


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decode keeping special tokens (meta-actions) but dropping padding."""
    pad = tokenizer.pad_token_id
    return tokenizer.decode([t for t in ids if t != pad], skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)


def token_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, temperature: float = 1.0,
    return_entropy: bool = False, return_hidden: bool = False, position_ids: torch.Tensor | None = None,
    entropy_grad: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-token log-probabilities of ``input_ids[:, 1:]`` under ``softmax(logits / T)``.

    Returns ``{"logp": [B, L-1]}`` (and ``"entropy"``, ``"hidden"`` on request); position
    ``t`` scores token ``t + 1``. Works with left or right padding: position ids are
    derived from the attention mask. For packed rows pass ``attention_mask=None`` and
    ``position_ids`` that restart at 0 for each packed sequence (each then attends only
    to itself).
    """
    if position_ids is None:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=return_hidden, use_cache=False)
    result = _score(out.logits[:, :-1], input_ids[:, 1:], temperature, return_entropy, entropy_grad)
    if return_hidden:
        result["hidden"] = out.hidden_states[-1]
    return result


def shared_prompt_supported(model: Any) -> bool:
    """Whether :func:`shared_prompt_logprobs` can run ``model`` (Llama layout, full attention,
    no attention dropout)."""
    return kv_decode_supported(model) and not float(getattr(model.config, "attention_dropout", 0.0) or 0.0)


def shared_prompt_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: Sequence[int],
    temperature: float = 1.0, return_entropy: bool = False, entropy_grad: bool = True,
) -> dict[str, torch.Tensor]:
    """:func:`token_logprobs` of right-padded ``prompt + response`` rows, computing each
    distinct prompt once.

    GRPO / RLOO rollouts hold n responses per prompt; here the rows that share a prompt
    (the first ``prompt_lens[b]`` tokens of row ``b``) share one pass over it: the prompts
    run once, left-padded, and every response attends to its prompt's keys and values
    (gradients flow back through them, summed over the group). Returns what
    :func:`token_logprobs` returns at every position that scores a response token
    (``[B, L-1]``, position ``t`` scoring token ``t + 1``); positions that score prompt
    tokens or padding hold arbitrary values (the response mask excludes them).
    Llama-layout models only (:func:`shared_prompt_supported`).
    """
    inner, cfg = model.model, model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    device = input_ids.device
    rows = input_ids.tolist()
    lengths = attention_mask.sum(1).tolist()
    prompts: dict[tuple[int, ...], int] = {}
    pick = [prompts.setdefault(tuple(r[:p]), len(prompts)) for r, p in zip(rows, prompt_lens)]
    responses = [r[p:n] for r, p, n in zip(rows, prompt_lens, lengths)]
    pad = 0  # any id: padding is masked
    width, span = max(len(p) for p in prompts), max(len(r) for r in responses)
    p_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    p_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for prompt, d in prompts.items():
        p_ids[d, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        p_mask[d, width - len(prompt):] = True
    r_ids = torch.full((len(rows), span), pad, dtype=torch.long)
    for b, r in enumerate(responses):
        r_ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    p_ids, p_mask, r_ids = p_ids.to(device), p_mask.to(device), r_ids.to(device)
    pick_t = torch.tensor(pick, device=device)
    starts = torch.tensor(list(prompt_lens), device=device)

    # the prompts: causal over their own tokens (a padding query sees itself, so no row is all masked)
    h = inner.embed_tokens(p_ids)
    cos, sin = inner.rotary_emb(h, (p_mask.long().cumsum(-1) - 1).clamp(min=0))
    eye = torch.eye(width, dtype=torch.bool, device=device)
    mask = ((p_mask[:, None, :] & eye.cumsum(0).bool()[None]) | eye[None])[:, None]
    prompt_kv = []
    for layer in inner.layers:
        q, k, v = _qkv(layer, h, cos, sin, head_dim)
        prompt_kv.append((k, v))
        h = _attend(layer, h, q, k, v, mask)
    logits = model.lm_head(inner.norm(h[:, -1]))[pick_t][:, None]  # scores each response's first token
    # the responses (all but their last token), each after its prompt's keys and values
    t = span - 1
    if t > 0:
        h = inner.embed_tokens(r_ids[:, :t])
        cos, sin = inner.rotary_emb(h, starts[:, None] + torch.arange(t, device=device)[None])
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        mask = torch.cat([p_mask[pick_t][:, None, :].expand(-1, t, -1), causal[None].expand(len(rows), -1, -1)],
                         dim=-1)[:, None]
        for layer, (pk, pv) in zip(inner.layers, prompt_kv):
            q, k, v = _qkv(layer, h, cos, sin, head_dim)
            h = _attend(layer, h, q, torch.cat([pk[pick_t], k], dim=2), torch.cat([pv[pick_t], v], dim=2), mask)
        logits = torch.cat([logits, model.lm_head(inner.norm(h))], dim=1)
    scored = _score(logits, r_ids, temperature, return_entropy, entropy_grad)  # [B, span]: response token j
    # back to the rows' layout: position t scores token t + 1 = response token t + 1 - prompt_len
    cols = (torch.arange(input_ids.shape[1] - 1, device=device)[None] + 1 - starts[:, None]).clamp(0, span - 1)
    return {key: value.gather(1, cols) for key, value in scored.items()}


def _score(logits: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool,
           entropy_grad: bool) -> dict[str, torch.Tensor]:
    """``{"logp"}`` of ``targets`` under ``softmax(logits / T)`` (and ``"entropy"`` on request;
    for logging only with ``entropy_grad=False``: no graph over ``[B, L, vocab]``)."""
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    result = {"logp": logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz}
    if return_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            lg, lz = (logits, logz) if entropy_grad else (logits.detach(), logz.detach())
            result["entropy"] = lz - (torch.softmax(lg, dim=-1) * lg).sum(-1)
    return result


def pack_sequences(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   pad_id: int, eos_id: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + response (+ eos)`` rows with masks for training.

    ``response_mask[b, t]`` is 1 where ``input_ids[b, t + 1]`` is a response token (aligned
    with :func:`token_logprobs`), so losses never touch prompt or padding positions.
    """
    rows = []
    for p, r in zip(prompt_ids, response_ids):
        resp = list(r) + ([eos_id] if eos_id is not None else [])
        rows.append((list(p), resp))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp_mask = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for b, (p, r) in enumerate(rows):
        seq = p + r
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        resp_mask[b, len(p) - 1: len(seq) - 1] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp_mask}
