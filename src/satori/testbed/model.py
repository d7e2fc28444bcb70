"""The testbed's tokenizer and tiny causal LM, built from scratch (no model hub).

The tokenizer is byte-level BPE, so every string round-trips exactly through encode/decode,
with digits split one per token (numbers are read digit by digit, which small models learn
far more easily than arbitrary multi-digit tokens). Pre-tokenization only isolates digits and
does not split at spaces, so frequent phrases ("Step ", " = ", the prompt) become single
tokens and sequences stay short. Pieces also end after every run of newlines, so a prompt ending in a
newline tokenizes the same alone as followed by its response (``tok(prompt + response) ==
tok(prompt) + tok(response)``), and a model never meets a boundary token at inference that it
did not see in training. Special tokens: ``<|endoftext|>`` (bos and eos) and
``<|pad|>``. The model is a small Llama built from a transformers config.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from satori.errors import SatoriError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

#: Phrases the synthesis critic writes; part of the tokenizer's training corpus so they
#: tokenize compactly even though the base model never sees them in pretraining.
CRITIC_PHRASES = (
    "Wait, let me check step 1.",
    "Wait, let me check step 2.",
    "Wait, let me check step 3.",
    "Let me verify step 4.",
    "Let me double-check the calculation.",
    "is wrong",
    "is correct",
    "should be",
    "It should be",
    "This step is correct.",
    "The calculation is correct.",
    "The previous step is wrong.",
    "Let me try again.",
    "Let me try another approach.",
    "verify",
    "correct",
    "incorrect",
    "mistake",
    "I made a mistake in step 2.",
    "Let's redo step 3.",
    "So the answer is",
    "check",
    "Hmm,",
    "Therefore",
    "Wait,",
    "Alternatively,",
    "because",
    "instead of",
)

#: Model sizes: hidden, layers, heads, intermediate.
SIZES = {
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 688,
    },
    "medium": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "intermediate_size": 1024,
    },
}


def build_tokenizer(
    corpus_texts: Iterable[str], vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (digits split individually) on ``corpus_texts``.

    The critic phrases are added to the corpus. Padding is on the left (for batched
    generation with a decoder-only model). The result saves with ``save_pretrained`` and
    loads with ``AutoTokenizer.from_pretrained``; ``decode(encode(x)) == x`` for any text.
    """
    if vocab_size < 300:
        raise SatoriError(
            f"tokenizer vocab_size must be at least 300 (256 bytes + specials), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n+"), behavior="merged_with_previous"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        max_token_length=24,
    )
    tok.train_from_iterator(_with_phrases(corpus_texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
        padding_side="left",
    )


def _with_phrases(corpus_texts: Iterable[str]) -> Iterable[str]:
    yield from corpus_texts
    for _ in range(20):
        yield from CRITIC_PHRASES


def build_model(
    vocab_size: int,
    size: str = "small",
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> LlamaForCausalLM:
    """A freshly initialised small Llama (``size`` in tiny/small/medium), tied embeddings.

    With ``tokenizer`` the config and ``generation_config`` get its bos/eos/pad ids. Eager
    attention: at these sizes a CPU training step is about 1.5x faster than with SDPA (whose
    CPU backward dominates); the choice is not saved, so pass ``attn_implementation="eager"``
    to ``from_pretrained`` to keep it.
    """
    if size not in SIZES:
        raise SatoriError(
            f"unknown testbed model size {size!r}; choose one of {', '.join(SIZES)}"
        )
    ids = {}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    dims = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        num_key_value_heads=dims["num_attention_heads"],
        attention_bias=False,
        attn_implementation="eager",
        **dims,
        **ids,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(max_new_tokens=256, **ids)
    return model


def count_parameters(model) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
