"""A tiny CLIP BPE tokenizer for the tools' small test and demo models: CLIP's vocabulary layout (the 256
byte-level symbols, the same with ``</w>``, one merge chain per word, ``<|startoftext|>``, ``<|endoftext|>``) with
only the words a model needs, so that transformers' ``CLIPTokenizer`` and our Rust tokenizer read it like a real
CLIP vocabulary. Used by make_sd_reference.py and make_demo_model.py."""

from __future__ import annotations

import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """The byte->unicode table of GPT-2/CLIP BPE (same order as CLIP's vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tiny_clip_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP layout: 256 byte chars, the same with </w>, merges, then <|startoftext|>, <|endoftext|>."""
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base]
    merges: list[tuple[str, str]] = []
    seen = set(vocab_list)
    for w in words:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        while len(syms) > 1:
            a, b = syms[0], syms[1]
            if (a, b) not in merges:
                merges.append((a, b))
            tok = a + b
            if tok not in seen:
                seen.add(tok)
                vocab_list.append(tok)
            syms = [tok] + syms[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def write_tokenizer(folder: Path, words: list[str], pad_token: str, max_len: int = 77) -> None:
    """A CLIPTokenizer folder (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json) in which
    each of `words` is one token."""
    folder.mkdir(parents=True, exist_ok=True)
    # longest words first: their merge chains then outrank the short words' merges, so every word is one token
    words = sorted(set(words), key=lambda w: (-len(w), w))
    vocab, merges = build_tiny_clip_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    cfg = dict(special)
    cfg.update(
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_len,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
        }
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
