"""Answers and system messages are rendered exactly as given, as the reference does."""

from __future__ import annotations

from tiny import CHATML, tiny_model, tiny_tokenizer

from personaxis.chat import render_chat
from personaxis.generation import decode_answer

TRIMMING = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")


def _decoded(lm, chat, span) -> str:
    return lm.tokenizer.decode(chat.input_ids[span.start : span.end])


def test_answer_span_keeps_leading_newline_and_trailing_spaces(tiny_llama):
    answer = "\nI am a pirate.  \n"
    chat = render_chat(
        tiny_llama.tokenizer,
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": answer}],
        tiny_llama.profile,
    )
    assert answer in chat.text
    assert _decoded(tiny_llama, chat, chat.spans[0]) == answer  # not "I am a pirate."
    assert [t.role for t in chat.turn_spans] == ["user", "assistant"]
    assert (chat.turn_spans[1].start, chat.turn_spans[1].end) == (chat.spans[0].start, chat.spans[0].end)


def test_explicitly_empty_system_message_is_kept(tiny_llama):
    plain = render_chat(tiny_llama.tokenizer, [{"role": "user", "content": "Hi"}], tiny_llama.profile)
    empty = render_chat(
        tiny_llama.tokenizer, [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}], tiny_llama.profile
    )
    assert empty.text == "<|im_start|>system\n<|im_end|>\n" + plain.text


def test_empty_system_message_is_dropped_on_a_template_without_system_role():
    lm = tiny_model("gemma2")
    chat = render_chat(lm.tokenizer, [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}], lm.profile)
    assert chat.text == "<start_of_turn>user\nHi<end_of_turn>\n"


def test_a_template_that_trims_contents_still_finds_the_span(tiny_llama):
    from dataclasses import replace

    tokenizer = tiny_tokenizer(TRIMMING)
    chat = render_chat(
        tokenizer,
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "\nI am a pirate. "}],
        replace(tiny_llama.profile),
    )
    assert tokenizer.decode(chat.input_ids[chat.spans[0].start : chat.spans[0].end]) == "I am a pirate."


def test_generated_text_is_not_stripped():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("\nArr, matey!  ", add_special_tokens=False)["input_ids"]
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text, n_new, stopped = decode_answer(tokenizer, [*ids, stop], {stop})
    assert (text, n_new, stopped) == ("\nArr, matey!  ", len(ids), True)
