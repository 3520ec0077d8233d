"""A tiny byte-level BPE tokenizer with a ChatML chat template, built locally (no hub access).

Reusable by every test: `build_tiny_tokenizer()` returns a `transformers.PreTrainedTokenizerFast` with
`<|im_end|>` as EOS, `<|endoftext|>` as pad, `<|im_start|>` as a special token, and a ChatML template that wraps
assistant turns in `{% generation %}` markers (so `return_assistant_tokens_mask=True` works). The vocabulary is
trained on a fixed corpus (arithmetic words, digits, a few hundred common words), so results are deterministic.
`save_tiny_tokenizer(path)` writes `tokenizer.json` + `tokenizer_config.json` (loadable with
`AutoTokenizer.from_pretrained(path)`).
"""

from __future__ import annotations

import functools

from trl_jax.assets import CHATML_TEMPLATE, SPECIAL_TOKENS  # one ChatML template with generation markers

# Same template without generation markers (for testing the assistant_only_loss error path).
CHATML_TEMPLATE_NO_MARKERS = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


_WORDS = (
    "the a an is are was were be been of to in on at for with by from and or not no yes it this that these those "
    "what which who where when why how much many plus minus times divided equals answer question sum product "
    "difference number numbers zero one two three four five six seven eight nine ten eleven twelve twenty hundred "
    "sky blue green red yellow sun sea moon star cat dog bird fish tree water fire earth air color colour good bad "
    "true false hello hi thanks please sure okay right wrong correct compute calculate add subtract multiply "
    "user assistant system tools tool call result you i we they he she my your our their me us them think know "
    "say said tell told give gave make made take took see saw come came go went get got like love want need "
    "small big large little long short high low old new first last next early late young great same other "
    "write read reverse repeat copy word words letter letters sentence count spell upper lower case "
    "The What How Is It Sky Sun Sea Answer Question Yes No Hello Thanks Sure"
)


def _corpus() -> list[str]:
    lines = [_WORDS]
    for a in range(0, 40):
        lines.append(" ".join(f"What is {a}+{b}? {a + b}. {a}-{b}={a - b} {a}*{b}={a * b}" for b in range(0, 40, 7)))
    lines.append("0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ? ! . , : ; ' \" ( ) [ ] { }")
    return lines


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE):
    """Return a fresh `PreTrainedTokenizerFast` (byte-level BPE, `vocab_size` entries, ChatML template)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_tokenizer(path, vocab_size: int = 512) -> str:
    """Write the tiny tokenizer to `path` (a directory) and return it."""
    build_tiny_tokenizer(vocab_size).save_pretrained(str(path))
    return str(path)
