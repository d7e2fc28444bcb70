"""Tests for satori.coat: the COAT step format, its metrics, and the tokenizer/model surgery."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from satori.coat import (
    ACTION_OF_TOKEN,
    CONTINUE,
    EXPLORE,
    META_TOKENS,
    REFLECT,
    TOKEN_OF_ACTION,
    Step,
    add_coat_tokens,
    answer_before_first_reflect,
    behaviour,
    coat_token_ids,
    final_answer_step,
    is_plain_cot,
    is_valid_coat,
    parse_steps,
    render_steps,
    split_cot_steps,
    to_cot,
)
from satori.errors import SatoriError

# --------------------------------------------------------------------------- constants


def test_constants_agree():
    assert META_TOKENS == ("<|continue|>", "<|reflect|>", "<|explore|>")
    assert [ACTION_OF_TOKEN[t] for t in META_TOKENS] == ["continue", "reflect", "explore"]
    assert all(TOKEN_OF_ACTION[ACTION_OF_TOKEN[t]] == t for t in META_TOKENS)


def test_step_rejects_unknown_action():
    with pytest.raises(SatoriError, match="unknown COAT action"):
        Step("think", "x")


# --------------------------------------------------------------------------- round trip

# Fragments that come close to meta tokens without being one, so the property explores the
# splitting boundaries and not only ordinary prose.
_FRAGMENTS = ["<|", "|>", "<", "|", ">", "reflect", "continue", "explore", "<|foo|>", " ", "\n",
              "a", "\\boxed{", "}", "{"]
_texts = st.one_of(
    st.text(max_size=20),
    st.lists(st.sampled_from(_FRAGMENTS), max_size=8).map("".join),
).filter(is_plain_cot)
_steps = st.lists(st.builds(Step, st.sampled_from(["continue", "reflect", "explore"]), _texts),
                  max_size=6)


@settings(max_examples=300, deadline=None)
@given(_steps)
def test_parse_inverts_render(steps):
    assert parse_steps(render_steps(steps)) == steps


@settings(max_examples=200, deadline=None)
@given(_steps)
def test_render_inverts_parse_for_rendered_text(steps):
    text = render_steps(steps)
    assert render_steps(parse_steps(text)) == text


def test_render_writes_first_continuation_bare_and_others_with_tokens():
    steps = [Step("continue", "a\n"), Step("reflect", " b"), Step("continue", "c")]
    assert render_steps(steps) == f"a\n{REFLECT} b{CONTINUE}c"
    assert render_steps([Step("reflect", "x")]) == f"{REFLECT}x"
    assert render_steps([Step("continue", "  ")]) == f"{CONTINUE}  "
    assert render_steps([]) == ""


def test_render_refuses_text_holding_a_meta_token():
    with pytest.raises(SatoriError, match="meta-action token"):
        render_steps([Step("continue", f"a{EXPLORE}b")])


# --------------------------------------------------------------------------- parse edge cases


def test_parse_first_step_without_token_is_continue_verbatim():
    steps = parse_steps(f"  Step 1: x = 2\n{REFLECT}\nCheck: ok.\n")
    assert steps == [Step("continue", "  Step 1: x = 2\n"), Step("reflect", "\nCheck: ok.\n")]


def test_parse_drops_blank_prefix():
    assert parse_steps(f" \n{CONTINUE}a") == [Step("continue", "a")]


def test_parse_tokens_mid_line():
    assert parse_steps(f"x = 1 {REFLECT} wait {EXPLORE} try y") == [
        Step("continue", "x = 1 "),
        Step("reflect", " wait "),
        Step("explore", " try y"),
    ]


def test_parse_adjacent_tokens_give_empty_steps():
    assert parse_steps(f"a{REFLECT}{EXPLORE}{CONTINUE}b") == [
        Step("continue", "a"),
        Step("reflect", ""),
        Step("explore", ""),
        Step("continue", "b"),
    ]


def test_parse_without_tokens_is_one_continue_step():
    assert parse_steps("Step 1: a\n\nStep 2: b") == [Step("continue", "Step 1: a\n\nStep 2: b")]


def test_parse_without_boxed_answer_and_with_text_after_it():
    assert parse_steps(f"a{REFLECT}b") == [Step("continue", "a"), Step("reflect", "b")]
    steps = parse_steps(f"a{CONTINUE}so \\boxed{{3}}. Done, thanks!")
    assert steps[-1] == Step("continue", "so \\boxed{3}. Done, thanks!")


def test_parse_unknown_tokens_are_plain_text():
    steps = parse_steps(f"a<|foo|>b<|reflect>c{REFLECT}<|endoftext|>")
    assert steps == [Step("continue", "a<|foo|>b<|reflect>c"), Step("reflect", "<|endoftext|>")]


def test_parse_empty_and_blank():
    assert parse_steps("") == []
    assert parse_steps(" \n\t") == []


# --------------------------------------------------------------------------- plain CoT


def test_split_cot_steps_on_blank_lines_and_step_lines():
    text = (
        "Step 1: Let x = 2.\nThen 2x = 4.\n\n\nStep 2: add 1\nStep 3: so \\boxed{5}\n"
        "## Step 4: markdown\n**Step 5:** bold\nStepping stone is not a step."
    )
    assert split_cot_steps(text) == [
        "Step 1: Let x = 2.\nThen 2x = 4.",
        "Step 2: add 1",
        "Step 3: so \\boxed{5}",
        "## Step 4: markdown",
        "**Step 5:** bold\nStepping stone is not a step.",
    ]


def test_split_cot_steps_plain_paragraphs_and_empty():
    assert split_cot_steps("a\nb\n\n  \nc\n") == ["a\nb", "c"]
    assert split_cot_steps("") == []
    assert split_cot_steps("\n\n \n") == []


def test_to_cot_and_is_plain_cot():
    steps = parse_steps(f"Step 1: a\n{REFLECT}\nCheck b.\n{EXPLORE}{CONTINUE}  c \\boxed{{1}}")
    cot = to_cot(steps)
    assert cot == "Step 1: a\n\nCheck b.\n\nc \\boxed{1}"
    assert is_plain_cot(cot)
    assert not is_plain_cot(f"a{CONTINUE}b")
    assert is_plain_cot("a<|foo|>b")
    assert split_cot_steps(cot) == ["Step 1: a", "Check b.", "c \\boxed{1}"]


# --------------------------------------------------------------------------- answers and metrics


def test_final_answer_step_is_last_step_with_balanced_box():
    steps = parse_steps(
        f"\\boxed{{1}}{REFLECT}wrong{EXPLORE}\\boxed{{\\frac{{1}}{{2}}}} ok{CONTINUE}\\boxed{{2"
    )
    assert final_answer_step(steps) == Step("explore", "\\boxed{\\frac{1}{2}} ok")
    assert final_answer_step(parse_steps("no answer")) is None
    assert final_answer_step([]) is None


def test_answer_before_first_reflect():
    r = f"a \\boxed{{1}}{REFLECT}no{EXPLORE}b \\boxed{{2}}{REFLECT}fine"
    assert answer_before_first_reflect(r) == "a \\boxed{1}"
    assert answer_before_first_reflect(f"a{EXPLORE}b") == f"a{EXPLORE}b"
    assert answer_before_first_reflect(f"{REFLECT}x") == ""
    assert answer_before_first_reflect("") == ""


def test_behaviour_counts():
    r = f"a{CONTINUE}b{REFLECT}c{EXPLORE}d{REFLECT}e{CONTINUE}f"
    assert behaviour(r) == {
        "n_steps": 6,
        "n_continue": 3,
        "n_reflect": 2,
        "n_explore": 1,
        "reflects": True,
        "explores": True,
    }
    plain = behaviour("just \\boxed{3}")
    assert plain == {"n_steps": 1, "n_continue": 1, "n_reflect": 0, "n_explore": 0,
                     "reflects": False, "explores": False}
    assert behaviour("")["n_steps"] == 0


@pytest.mark.parametrize(
    "response",
    [
        "x = 3, so \\boxed{3}",
        f"a{CONTINUE}b \\boxed{{3}}",
        f"a \\boxed{{2}}{REFLECT}Check: wrong.{EXPLORE}Try b.{CONTINUE}\\boxed{{3}}",
        f"a{REFLECT}ok{EXPLORE}b{EXPLORE}c \\boxed{{\\{{1,2\\}}}} and some trailing words",
        f"a{CONTINUE}\\boxed{{\\frac{{1}}{{2}}}}",
    ],
)
def test_valid_coat(response):
    assert is_valid_coat(response)


@pytest.mark.parametrize(
    "response",
    [
        "",
        "   ",
        "no boxed answer at all",
        f"\\boxed{{3}}{CONTINUE}then more text",  # box not in the last step
        f"a{EXPLORE}b \\boxed{{3}}",  # explore before any reflect
        f"a{EXPLORE}b{REFLECT}c \\boxed{{3}}",  # explore before the first reflect
        f"a{REFLECT}{EXPLORE}b \\boxed{{3}}",  # blank step
        f"a{REFLECT}  \n{CONTINUE}b \\boxed{{3}}",  # whitespace-only step
        f"a{CONTINUE}\\boxed{{3",  # unbalanced
        f"a{CONTINUE}\\boxed{{ }}",  # empty box
        f"a{CONTINUE}\\boxed{{3\\}}",  # escaped closing brace does not close
    ],
)
def test_invalid_coat(response):
    assert not is_valid_coat(response)


# --------------------------------------------------------------------------- tokenizer and model

_CORPUS = ["Step 1: the answer is \\boxed{42}.", "a b c d e f 1 2 3 + - = x y"] * 8


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer, trained locally, with one existing extra special token."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
        extra_special_tokens=["<tool>"],
    )


def make_model(vocab_size: int, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def test_add_tokens_are_single_special_tokens():
    tok = make_tokenizer()
    n_before = len(tok)
    ids = add_coat_tokens(tok)
    assert ids == list(range(n_before, n_before + 3))
    assert len(tok) == n_before + 3
    assert coat_token_ids(tok) == dict(zip(META_TOKENS, ids))
    for token, i in zip(META_TOKENS, ids):
        assert tok.encode(token, add_special_tokens=False) == [i]
    assert set(ids) <= set(tok.all_special_ids)
    assert "<tool>" in tok.extra_special_tokens  # existing extra special tokens survive

    enc = tok.encode("a<|reflect|>b", add_special_tokens=False)
    assert enc.count(ids[1]) == 1 and len(enc) == 3
    assert tok.decode(enc, skip_special_tokens=False) == "a<|reflect|>b"
    assert tok.decode(enc, skip_special_tokens=True) == "ab"
    text = f"Step 1: x{REFLECT} check{EXPLORE} y{CONTINUE}\\boxed{{42}}"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_add_tokens_is_idempotent():
    tok = make_tokenizer()
    first = add_coat_tokens(tok)
    n = len(tok)
    assert add_coat_tokens(tok) == first
    assert len(tok) == n
    assert tok.extra_special_tokens.count(REFLECT) == 1


def test_coat_token_ids_requires_the_tokens():
    with pytest.raises(SatoriError, match="add_coat_tokens"):
        coat_token_ids(make_tokenizer())


@pytest.mark.parametrize("tied", [True, False])
def test_model_rows_grow_and_equal_old_mean(tied):
    tok = make_tokenizer()
    n_old = len(tok)
    model = make_model(n_old, tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    if not tied:
        assert not torch.equal(old_in, old_out)

    ids = add_coat_tokens(tok, model)

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok) == model.config.vocab_size
    assert torch.equal(emb[:n_old], old_in)
    assert torch.equal(head[:n_old], old_out)
    for i in ids:
        torch.testing.assert_close(emb[i], old_in.mean(0))
        torch.testing.assert_close(head[i], old_out.mean(0))
    assert (emb.data_ptr() == head.data_ptr()) == tied

    logits = model(torch.tensor([[5, ids[1], 6, ids[2]]])).logits
    assert logits.shape == (1, 4, len(tok)) and torch.isfinite(logits).all()
    # mean-initialised rows share one logit: the new tokens are equally likely
    torch.testing.assert_close(logits[0, :, ids[0]], logits[0, :, ids[2]])

    # a second call changes nothing
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    assert add_coat_tokens(tok, model) == ids
    after = model.state_dict()
    assert snapshot.keys() == after.keys()
    assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)


def test_untied_head_bias_gets_old_mean():
    tok = make_tokenizer()
    n_old = len(tok)
    model = make_model(n_old, tied=False)
    head = torch.nn.Linear(32, n_old, bias=True)
    torch.nn.init.normal_(head.bias)
    model.set_output_embeddings(head)
    old_bias = head.bias.detach().clone()
    old_w = head.weight.detach().clone()

    ids = add_coat_tokens(tok, model)

    new_head = model.get_output_embeddings()
    assert new_head.bias.shape == (len(tok),)
    assert torch.equal(new_head.bias[:n_old], old_bias)
    assert torch.equal(new_head.weight[:n_old], old_w)
    for i in ids:
        torch.testing.assert_close(new_head.bias[i], old_bias.mean())
        torch.testing.assert_close(new_head.weight[i], old_w.mean(0))


def test_padded_vocab_is_not_shrunk_and_added_rows_are_initialised():
    tok = make_tokenizer()
    n_old = len(tok)
    model = make_model(n_old + 16, tied=False)  # vocabulary padded beyond the tokenizer
    old_in = model.get_input_embeddings().weight.detach().clone()
    ids = add_coat_tokens(tok, model)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n_old + 16
    for i in ids:
        torch.testing.assert_close(emb[i], old_in[:n_old].mean(0))
    untouched = [i for i in range(n_old + 16) if i not in ids]
    assert torch.equal(emb[untouched], old_in[untouched])


def test_fresh_model_for_tokenizer_that_already_has_tokens():
    tok = make_tokenizer()
    n_old = len(tok)
    add_coat_tokens(tok)
    model = make_model(n_old, tied=True)
    old_in = model.get_input_embeddings().weight.detach().clone()
    ids = add_coat_tokens(tok, model)  # adds no token, but the model still needs rows
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    for i in ids:
        torch.testing.assert_close(emb[i], old_in.mean(0))


def test_save_and_load_round_trip(tmp_path):
    tok = make_tokenizer()
    model = make_model(len(tok), tied=False)
    ids = add_coat_tokens(tok, model)
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)

    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert coat_token_ids(tok2) == dict(zip(META_TOKENS, ids))
    assert set(ids) <= set(tok2.all_special_ids)
    text = f"a{REFLECT}b{EXPLORE}c"
    enc = tok2.encode(text, add_special_tokens=False)
    assert enc == tok.encode(text, add_special_tokens=False)
    assert tok2.decode(enc, skip_special_tokens=False) == text
    assert model2.config.vocab_size == len(tok2)
    x = torch.tensor([enc])
    with torch.no_grad():
        torch.testing.assert_close(model2(x).logits, model(x).logits)
    assert add_coat_tokens(tok2, model2) == ids
    assert len(tok2) == len(tok)


@pytest.mark.parametrize("tied", [True, False])
def test_text_init_starts_each_meta_token_at_its_words(tied):
    from satori.coat import INIT_TEXT

    tok = make_tokenizer()
    model = make_model(len(tok), tied)
    sources = {t: tok(INIT_TEXT[t], add_special_tokens=False)["input_ids"] for t in META_TOKENS}
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    ids = add_coat_tokens(tok, model, init="text")
    for t, i in zip(META_TOKENS, ids):
        torch.testing.assert_close(model.get_input_embeddings().weight[i], old_in[sources[t]].mean(0))
        torch.testing.assert_close(model.get_output_embeddings().weight[i], old_out[sources[t]].mean(0))
    assert not torch.equal(model.get_input_embeddings().weight[ids[0]], model.get_input_embeddings().weight[ids[1]])
    with pytest.raises(SatoriError, match="init"):
        add_coat_tokens(make_tokenizer(), make_model(len(tok), tied), init="zeros")


def test_text_init_takes_other_words_per_action():
    from satori.coat import INIT_TEXT

    tok = make_tokenizer()
    model = make_model(len(tok), tied=True)
    old = model.get_input_embeddings().weight.detach().clone()
    ids = add_coat_tokens(tok, model, init="text", init_text={"reflect": "check b", "explore": "a"})
    emb = model.get_input_embeddings().weight
    for text, i in ((INIT_TEXT[CONTINUE], ids[0]), ("check b", ids[1]), ("a", ids[2])):
        source = tok(text, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(emb[i], old[source].mean(0))
    with pytest.raises(SatoriError, match="unknown action 'verify'"):
        add_coat_tokens(make_tokenizer(), make_model(len(tok), True), init="text", init_text={"verify": "x"})
    with pytest.raises(SatoriError, match="coat_init_text.explore: needs a non-empty text"):
        add_coat_tokens(make_tokenizer(), make_model(len(tok), True), init="text", init_text={"explore": ""})
