import pytest
from transformers import AutoTokenizer

from dynrefer_hf.shapes import train_t5_style_tokenizer

CORPUS = ["a red striped circle left of a blue square", "the dog lies on the grass", "person,dog|"]


def test_same_texts_give_the_same_vocabulary():
    first = train_t5_style_tokenizer(CORPUS * 3, vocab_size=80)
    second = train_t5_style_tokenizer(CORPUS * 3, vocab_size=80)
    assert first.get_vocab() == second.get_vocab()


def test_t5_conventions_and_round_trip(tmp_path):
    tokenizer = train_t5_style_tokenizer(CORPUS, vocab_size=80)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    encoded = tokenizer(["person,dog|", "The red circle"]).input_ids
    assert all(ids[-1] == tokenizer.eos_token_id for ids in encoded)
    assert tokenizer.batch_decode(encoded, skip_special_tokens=True) == ["person,dog|", "the red circle"]
    # Whole words are single pieces; the control separators are pieces of their own.
    assert tokenizer.convert_ids_to_tokens(encoded[0][:-1]) == ["\u2581person", ",", "dog", "|"]
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(["person,dog|"]).input_ids == encoded[:1]


def test_vocab_size_caps_the_word_pieces():
    small = train_t5_style_tokenizer(CORPUS, vocab_size=40)
    assert len(small) <= 40
    # Spelled out from characters when the word did not fit, but still decodable.
    ids = small("striped square").input_ids
    assert small.decode(ids, skip_special_tokens=True) == "striped square"


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty text"):
        train_t5_style_tokenizer(["   "])
    with pytest.raises(ValueError, match="smaller than"):
        train_t5_style_tokenizer(CORPUS, vocab_size=5)
