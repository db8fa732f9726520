"""The tokenizer a GGUF file carries (``tokenizer.ggml.*``), rebuilt as a `tokenizers` Tokenizer.

We take byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: SmolLM2, Qwen2, LLaMA-3
and most current models). The pre-tokenizer (how text is split before BPE) is named by
``tokenizer.ggml.pre``; each name we take maps to the split that the Hugging Face tokenizer of
those models performs. Control and user-defined tokens (``<|im_start|>``, ...) are added as
special tokens, so chat markers encode as one id each and are skipped when decoding.
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import CheckpointError
from .gguf_file import GGUFFile

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(regex: bool = True) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=regex)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                    _byte_level(regex=False)])


# tokenizer.ggml.pre -> the pre-tokenizer that splits text as that model's tokenizer does.
PRE_TOKENIZERS = {
    "default": lambda: _byte_level(),
    "gpt-2": lambda: _byte_level(),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


def gguf_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """The file's tokenizer; refuses vocabularies and splits we do not implement."""
    kind = gguf.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{gguf.path}: tokenizer model {kind!r} is not supported (supported: 'gpt2', "
                              f"byte-level BPE); put the model's tokenizer.json beside the GGUF file instead")
    pre = gguf.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{gguf.path}: tokenizer pre-tokenizer {pre!r} is not supported "
                              f"(supported: {', '.join(PRE_TOKENIZERS)}); put the model's tokenizer.json beside "
                              f"the GGUF file instead")
    tokens = gguf.tokens
    if not tokens:
        raise CheckpointError(f"{gguf.path}: metadata key 'tokenizer.ggml.tokens' is missing")
    merges = [tuple(m.split(" ", 1)) for m in gguf.get("tokenizer.ggml.merges", [])]
    kinds = list(gguf.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(kinds) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False)
                          for i, kind in enumerate(kinds) if kind == _USER_DEFINED])
    return tokenizer
