"""Start-up checks that the proxy lines up with the teacher.

Δ is indexed by token id: if the proxy's id 1234 is a different string than the teacher's, λ·Δ
pushes the teacher towards arbitrary tokens. These checks stop start-up instead, naming the first
id that differs.
"""

from __future__ import annotations

from typing import Any


class VocabularyMismatch(ValueError):
    """The proxy's tokenizer or vocabulary does not line up with the teacher's."""


def check_vocab_alignment(proxy_tok: Any, teacher_tok: Any, proxy_vocab_size: int, teacher_width: int) -> None:
    """Raise VocabularyMismatch naming the first token id whose string differs.

    ``proxy_vocab_size`` is the proxy's embedding rows; ``teacher_width`` the teacher's logits
    width (often padded past its tokenizer). Δ is zero-padded from the first to the second.
    """
    if proxy_vocab_size > teacher_width:
        raise VocabularyMismatch(
            f"proxy vocabulary ({proxy_vocab_size}) is wider than the teacher's logits ({teacher_width})"
        )
    n_proxy, n_teacher = len(proxy_tok), len(teacher_tok)
    proxy_tokens = proxy_tok.convert_ids_to_tokens(list(range(n_proxy)))
    teacher_tokens = teacher_tok.convert_ids_to_tokens(list(range(min(n_proxy, n_teacher))))
    for token_id, (p, t) in enumerate(zip(proxy_tokens, teacher_tokens, strict=False)):
        if p != t:
            raise VocabularyMismatch(f"token id {token_id}: proxy has {p!r}, teacher has {t!r}")
    if n_proxy > n_teacher:
        raise VocabularyMismatch(
            f"token id {n_teacher}: proxy has {proxy_tokens[n_teacher]!r}, teacher's tokenizer ends at {n_teacher}"
        )


def check_proxy_matches_teacher(proxy_dir: str, teacher_dir: str, proxy_vocab_size: int, teacher_width: int) -> None:
    """Load both tokenizers and compare them (see ``check_vocab_alignment``)."""
    from transformers import AutoTokenizer

    check_vocab_alignment(
        AutoTokenizer.from_pretrained(proxy_dir),
        AutoTokenizer.from_pretrained(teacher_dir),
        proxy_vocab_size,
        teacher_width,
    )
