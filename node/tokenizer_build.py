"""Build the embedded model's tokenizer locally with the ``tokenizers`` library.

Byte-level BPE, as GPT-2 and Llama 3 use: every byte string has an encoding, so unseen names, other
scripts and emoji all tokenize (no ``<unk>``) and decode back exactly. It is trained on our own corpus
(the synthetic facts, every prompt template and a sample of reading passages), so the merges fit the
invented names' syllables and a typical name is two to four tokens.

The result is wrapped as a ``PreTrainedTokenizerFast`` and saved with ``save_pretrained``, so
``AutoTokenizer.from_pretrained(dir)`` loads it like any Hugging Face tokenizer. Encoding prepends
``<s>`` (as Llama tokenizers do), so callers get the same ids the model was trained on without thinking.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from memfed.node.offline import ensure_offline

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


def train_tokenizer(corpus: Iterable[str], *, vocab_size: int = 2048) -> Tokenizer:
    """Train a byte-level BPE on ``corpus``; deterministic for the same corpus in the same order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    _finish(tok)
    return tok


def byte_tokenizer() -> Tokenizer:
    """The same byte-level scheme with no merges: 3 special tokens + 256 byte tokens, no training.

    For the tiny random-init test models: instant, and still encodes any string.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    _finish(tok)
    return tok


def _finish(tok: Tokenizer) -> None:
    # add_prefix_space=False: "Answer: Quorn" and "Answer:" + " Quorn" tokenize alike, which keeps the
    # answer's tokens the same whether it is encoded with its prompt or alone (with its leading space).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )


def wrap_tokenizer(tok: Tokenizer, *, model_max_length: int) -> PreTrainedTokenizerFast:
    """The ``transformers`` view of ``tok``, with its special tokens named.

    ``padding_side="left"``: the host's main job is batched generation, which needs left padding. The
    model uses rotary positions, which are relative, so left padding is harmless for training passes too.
    """
    ensure_offline()
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
