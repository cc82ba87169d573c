"""The project's own character-level tokenizer: one token per character of the task
alphabet and the prompt format, plus pad/bos/eos/unk. Built with `tokenizers` (WordLevel)
and saved as a PreTrainedTokenizerFast, so transformers and vLLM both load it from the
model directory. Nothing is downloaded."""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ida_ray.prompts import RESERVED
from ida_ray.tasks.base import QUESTION_CHARS

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
ALPHABET = sorted(set(QUESTION_CHARS + RESERVED + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def bos_ids(tokenizer) -> list[int]:
    """[BOS] for a tokenizer that defines one (Llama's, the project's); [] for one that has
    none (Qwen's). Every sequence the project encodes starts with this."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins tokens without spaces, so decode(encode(s)) == s, in vLLM's incremental
    # detokenizer too.
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False)
