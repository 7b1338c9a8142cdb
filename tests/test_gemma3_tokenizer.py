"""Gemma 3's tokenizer side: its special pieces (image markers) and the chat format, against
transformers with Google's own chat templates.

The references are Google's chat templates as published with the instruct checkpoints on
the Hugging Face hub (tokenizer_config.json's "chat_template"), rendered by transformers'
`apply_chat_template` on a transformers tokenizer built on the same tiny SentencePiece model.
There is no network here: the templates' text is quoted below from public copies of those
files (see each), and the copies agree with one another.
"""

import json

import pytest
import sentencepiece as spm

import gemma_keras as gk
from conftest import GEMMA3_PIECES
from gemma_keras.checkpoints.hf_writer import CHAT_TEMPLATE, write_hf_tokenizer
from gemma_keras.config import GemmaConfig
from gemma_keras.tokenizer import format_chat

# google/gemma-3-1b-it (and -4b-it, -12b-it, -27b-it) tokenizer_config.json "chat_template",
# JSON-decoded. Copies read: the gemma-3-1b-it file quoted in gorilla's BFCL Gemma handler
# (bfcl/model_handler/local_inference/gemma.py) and onnxruntime-extensions' GEMMA3_CHAT_TEMPLATE.
GOOGLE_GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
# google/gemma-2-*-it's (google/gemma-7b-it's is the same), as quoted by the unsloth/gemma-2-9b-it
# mirror and swift-jinja's tests: no system turn, the same turns, each message trimmed.
GOOGLE_GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
    "not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == "
    "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
    "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\\n'}}{% endif %}")

IMAGE_PIECES = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<img>"]


def _messages(*turns):
    return [{"role": role, "content": text} for role, text in turns]


# Conversations in transformers' form, text only. Whitespace around messages (ASCII and
# Unicode) is where a formatter that does not trim as the templates do would differ.
SYSTEM = ("system", " Be brief.\n")
CONVERSATIONS = [
    _messages(SYSTEM, ("user", "  What is Keras? \n"), ("assistant", "A deep learning API.\n\n"),
              ("user", "\u3000And 12 x 7?\t"), ("assistant", "84"), ("user", "Thanks!\xa0")),
    _messages(("system", "Answer in French."), ("user", "The quick brown fox")),
    _messages(("user", "The quick brown fox"), ("assistant", " jumps "), ("user", "over\n")),
    _messages(("user", "one line\ntwo lines\n\n")),
    _messages(("user", "   "), ("assistant", "")),  # blank messages trim to nothing
]
# What each template refuses: turns that do not alternate from the user's.
NOT_ALTERNATING = [
    _messages(("user", "a"), ("user", "b")),
    _messages(("assistant", "a"), ("user", "b")),
    _messages(SYSTEM, ("assistant", "a")),
    _messages(("user", "a"), ("assistant", "b"), ("assistant", "c")),
]


def _reference_tokenizer(spm_path, directory, template):
    """transformers' Gemma tokenizer on `spm_path`, built without our writer: the pieces
    special as Google's tokenizer_config.json declares them, `template` its chat template."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(spm_path.read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    present = [p for p in GEMMA3_PIECES if sp.piece_to_id(p) != sp.unk_id()]
    # transformers 5 spells additional_special_tokens extra_special_tokens.
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "mask_token": None,
        "extra_special_tokens": present}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    tokenizer.chat_template = template
    return tokenizer


def _ids(encoded):
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _ours(messages):
    """Our format_chat's input for transformers' messages: (role, text) pairs."""
    return [(m["role"], m["content"]) for m in messages]


@pytest.fixture(scope="module")
def google(gemma3_spm_path, tmp_path_factory):
    return _reference_tokenizer(gemma3_spm_path, tmp_path_factory.mktemp("google3"),
                                GOOGLE_GEMMA3_TEMPLATE)


# ---- 1. the special pieces ------------------------------------------------------------------
@pytest.mark.once("jax")
def test_gemma3_pieces_are_special_and_read_from_the_model(gemma3_spm_path, google):
    tokenizer = gk.GemmaTokenizer(gemma3_spm_path)
    sp = spm.SentencePieceProcessor(model_file=str(gemma3_spm_path))
    assert tokenizer.stop_token_ids(instruct=True) == [sp.piece_to_id("<eos>"),
                                                       sp.piece_to_id("<end_of_turn>")]
    assert tokenizer.stop_token_ids(instruct=False) == [sp.piece_to_id("<eos>")]
    text = "Look<start_of_image><img><image_soft_token><end_of_image> at the fox<end_of_turn>"
    ids = tokenizer.tokenize(text, add_bos=True)
    # Never split: each piece written in the text is its one id, as transformers encodes it.
    assert ids == _ids(google(text))
    for piece in IMAGE_PIECES:
        assert sp.piece_to_id(piece) in ids and sp.piece_to_id(piece) in tokenizer.special_token_ids
    # skip_special leaves them out, as transformers' skip_special_tokens.
    ids += [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.detokenize(ids, skip_special=True) == google.decode(
        ids, skip_special_tokens=True) == "Look at the fox"
    assert tokenizer.detokenize(ids) == "Look<start_of_image><img><image_soft_token>" \
                                        "<end_of_image> at the fox<end_of_turn>"


@pytest.mark.once("jax")
def test_control_type_special_pieces_are_not_split_either(gemma3_spm_path, tmp_path):
    """SentencePiece reads a control piece written in a text as characters: a vocabulary
    whose image or turn markers are control pieces still gets each as one id."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(gemma3_spm_path.read_bytes())
    for piece in proto.pieces:
        if piece.piece in GEMMA3_PIECES:
            piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    control = gk.GemmaTokenizer(proto.SerializeToString())
    user_defined = gk.GemmaTokenizer(gemma3_spm_path)
    plain = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    text = "<start_of_turn>user\nSee <start_of_image><img><end_of_image>!<end_of_turn>\n"
    assert len(plain.encode(text)) > len(user_defined.tokenize(text))  # split without us
    assert control.tokenize(text) == user_defined.tokenize(text)
    assert control.tokenize([text, "fox"]) == user_defined.tokenize([text, "fox"])
    assert control.special_token_ids == user_defined.special_token_ids


# ---- 2. the chat format ---------------------------------------------------------------------
@pytest.mark.once("jax")
def test_format_chat_is_googles_gemma3_template(gemma3_spm_path, google):
    tokenizer = gk.GemmaTokenizer(gemma3_spm_path)
    for messages in CONVERSATIONS:
        for add in (True, False):
            text = google.apply_chat_template(messages, add_generation_prompt=add,
                                              tokenize=False)
            assert "<bos>" + format_chat(_ours(messages), add) == text, (messages, add)
            # The same as dicts, "assistant" or "model" alike.
            assert "<bos>" + format_chat(messages, add) == text
            ids = google.apply_chat_template(messages, add_generation_prompt=add)
            assert tokenizer.tokenize(format_chat(messages, add), add_bos=True) == _ids(ids)
    renamed = [(("model" if r == "assistant" else r), t) for r, t in _ours(CONVERSATIONS[0])]
    assert format_chat(renamed) == format_chat(CONVERSATIONS[0])
    for messages in NOT_ALTERNATING:  # refused by both
        with pytest.raises(Exception, match="alternate"):
            google.apply_chat_template(messages, tokenize=False)
        with pytest.raises(gk.InvalidArgumentError, match="alternate user, model"):
            format_chat(_ours(messages))


@pytest.mark.once("jax")
def test_gemma2_template_writes_the_same_turns(spm_path, tmp_path):
    """One format for every Gemma: Google's Gemma 2 template (no system turn) writes what
    format_chat writes."""
    gemma2 = _reference_tokenizer(spm_path, tmp_path, GOOGLE_GEMMA2_TEMPLATE)
    for messages in CONVERSATIONS:
        if messages[0]["role"] != "system":
            for add in (True, False):
                assert gemma2.apply_chat_template(messages, add_generation_prompt=add,
                                                  tokenize=False) == "<bos>" + format_chat(
                    messages, add)


@pytest.mark.once("jax")
def test_format_chat_refuses_what_is_not_a_conversation():
    with pytest.raises(gk.InvalidArgumentError, match=r"messages\[2\].*'system'.*only first"):
        format_chat([("user", "a"), ("model", "b"), ("system", "c")])
    with pytest.raises(gk.InvalidArgumentError, match=r"messages\[0\]: role must be"):
        format_chat([("tool", "a")])
    with pytest.raises(gk.ArgumentTypeError, match=r"messages\[1\]: the text must be a string"):
        format_chat([("user", "a"), ("model", None)])
    with pytest.raises(gk.ArgumentTypeError, match=r"messages\[0\] must be a \(role, text\)"):
        format_chat(["hello"])
    with pytest.raises(gk.ArgumentTypeError, match="messages must be a list"):
        format_chat("hello")


@pytest.mark.once("jax")
def test_chat_with_a_system_prompt_is_googles_template(gemma3_spm_path, google):
    """lm.chat(system=...) over several turns holds the ids transformers writes for the same
    conversation with Google's template, around the model's own replies."""
    tokenizer = gk.GemmaTokenizer(gemma3_spm_path)
    config = GemmaConfig(vocabulary_size=tokenizer.vocabulary_size, num_layers=2, hidden_dim=32,
                         intermediate_dim=64, num_query_heads=2, num_key_value_heads=1,
                         head_dim=16, use_query_key_norm=True, use_post_ffw_norm=True,
                         use_post_attention_norm=True, use_sliding_window_attention=True,
                         sliding_window_size=8, max_sequence_length=256)
    lm = gk.GemmaCausalLM(gk.GemmaBackbone(config), tokenizer, instruct=True)
    system, questions = " Be brief.\n", ["  The quick brown fox \n", "jumps\tover?\n", "Gemma"]
    chat = lm.chat(system=system)
    expected, conversation = [], [{"role": "system", "content": system}]
    eot = tokenizer.end_of_turn_id
    for question in questions:
        chat.send(question, max_new_tokens=3)
        conversation.append({"role": "user", "content": question})
        text = google.apply_chat_template(conversation, tokenize=False,
                                          add_generation_prompt=True)
        new = text.rsplit("\ue000", 1)[-1]  # what follows the last reply (all of turn 1's)
        if expected:  # the last reply's turn ends with its <end_of_turn>, sampled or not
            assert new.startswith("<end_of_turn>")
            new = new[len("<end_of_turn>"):]
            expected += [] if expected[-1] == eot else [eot]
        expected += _ids(google(new, add_special_tokens=False)) + chat.last_reply_ids
        conversation.append({"role": "assistant", "content": "\ue000"})  # a stand-in reply
        assert chat.token_ids == expected, question


# ---- 3. what a Hugging Face save writes -----------------------------------------------------
@pytest.mark.once("jax")
@pytest.mark.parametrize("gemma3", [True, False])
def test_written_tokenizer_is_googles_in_transformers(gemma3, gemma3_spm_path, spm_path,
                                                      tmp_path):
    import transformers

    path = gemma3_spm_path if gemma3 else spm_path
    tokenizer = gk.GemmaTokenizer(path)
    (tmp_path / "hf").mkdir()
    write_hf_tokenizer(tokenizer, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    google = _reference_tokenizer(path, tmp_path / "google", GOOGLE_GEMMA3_TEMPLATE)
    # The special pieces, image markers included, and no token beyond the vocabulary.
    pieces = [p for p in GEMMA3_PIECES if tokenizer.token_to_id(p) is not None]
    assert pieces == (GEMMA3_PIECES if gemma3 else ["<start_of_turn>", "<end_of_turn>"])
    assert set(pieces) <= set(hf.all_special_tokens)
    assert len(hf) == tokenizer.vocabulary_size
    if gemma3:  # transformers' names, which its Gemma 3 processor reads
        assert (hf.boi_token, hf.eoi_token, hf.image_token) == (
            "<start_of_image>", "<end_of_image>", "<image_soft_token>")
        assert hf.image_token_id == tokenizer.token_to_id("<image_soft_token>")
    text = "".join(f"{p} fox {i}" for i, p in enumerate(pieces)) + "<eos><bos>"
    ids = tokenizer.tokenize(text.replace("<eos><bos>", ""), add_bos=True) + [
        tokenizer.eos_token_id, tokenizer.bos_token_id]
    assert _ids(hf(text)) == _ids(google(text)) == ids
    assert hf.decode(ids, skip_special_tokens=True) == tokenizer.detokenize(
        ids, skip_special=True)
    # The chat template: ours' ids, system turn included, and Google's behaviour, image parts
    # and a system message given as parts too.
    for messages in CONVERSATIONS:
        for add in (True, False):
            written = hf.apply_chat_template(messages, add_generation_prompt=add)
            assert _ids(written) == tokenizer.tokenize(format_chat(messages, add),
                                                       add_bos=True), messages
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief. "}]},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What "
                                                              "is it?\n"}, {"type": "image"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A fox. "}]},
             {"role": "user", "content": "And this?"}]
    for messages in CONVERSATIONS + [parts, parts[1:], parts[:2]]:
        assert hf.apply_chat_template(messages, tokenize=False) == google.apply_chat_template(
            messages, tokenize=False)
    for messages in NOT_ALTERNATING:
        with pytest.raises(Exception, match="alternate"):
            hf.apply_chat_template(messages, tokenize=False)
    assert hf.chat_template == CHAT_TEMPLATE
