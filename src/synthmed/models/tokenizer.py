"""An offline CLIP tokenizer for the tiny preset: CLIP's byte-level BPE with a small vocabulary.

It has every byte (alone and word-final), so any text tokenizes, and whole-word merges for
the medical vocabulary our prompts use, so a prompt stays well inside 77 tokens. It is saved
in the standard CLIPTokenizer files (vocab.json + merges.txt), loadable by any transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words our prompt templates and common medical prompts use.
VOCABULARY = """
h&e histology histopathology patch tile tissue nuclei nucleus cells cell with and of a an the no none
neoplastic inflammatory connective dead epithelial background stroma lumen gland
breast colon lung kidney prostate stomach liver skin bladder cervix esophagus ovarian pancreatic
testis thyroid uterus adrenal bile duct headneck
mri ct ultrasound mammogram x-ray slice brain cardiac tumour tumor oedema edema core enhancing
necrotic myocardium ventricle left right cavity benign malignant normal cancerous non-cancerous
mass calcification spiculated irregular oval round lesion dense fatty her2 ihc 0 1+ 2+ 3+
metastasis lymph node healthy dcm hcm minf nor rv t1 t2 flair t1ce grade low high
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _pieces(word: str) -> list[str]:
    """How CLIP's pre-tokenizer splits a word (letters, digits and symbols apart)."""
    import re

    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", word)


def build_vocab_and_merges(words=VOCABULARY) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte alphabet + BPE merges trained (with `tokenizers`) until each vocabulary word is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    alphabet = list(_bytes_to_unicode().values())
    pieces = sorted({p for w in words for p in _pieces(w.lower())})
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, show_progress=False, initial_alphabet=alphabet, end_of_word_suffix="</w>"
    )
    bpe.train_from_iterator(pieces, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokens = alphabet + [c + "</w>" for c in alphabet]
    seen = set(tokens)
    tokens += [a + b for a, b in merges if a + b not in seen and not seen.add(a + b)]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_legacy_tokenizer_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Also write vocab.json + merges.txt, which older transformers' CLIPTokenizer needs."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tokenizer(folder: Path | None = None, max_length: int = 77) -> CLIPTokenizer:
    """Build the offline tokenizer; if `folder` is given, write the standard files there first."""
    vocab, merges = build_vocab_and_merges()
    if folder is None:
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.save_pretrained(folder)
    write_legacy_tokenizer_files(tok, folder)
    return CLIPTokenizer.from_pretrained(folder)
