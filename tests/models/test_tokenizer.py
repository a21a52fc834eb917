from transformers import CLIPTokenizer

from synthmed.models.tokenizer import VOCABULARY, build_tokenizer


def test_vocabulary_words_are_single_tokens():
    tok = build_tokenizer()
    for word in ("histology", "neoplastic", "epithelial", "mammogram", "malignant"):
        assert word in VOCABULARY
        assert len(tok(word).input_ids) == 3  # BOS, word, EOS


def test_any_text_tokenizes_and_legacy_files_agree(tmp_path):
    tok = build_tokenizer(tmp_path)
    ids = tok("zebra xylophone 123 ü").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    legacy = CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    prompt = "h&e histology, colon tissue, nuclei: dead, epithelial"
    assert legacy(prompt).input_ids == tok(prompt).input_ids
    assert len(tok(prompt).input_ids) < 20
