"""Answer tokens by continuation, on tokenizers that behave like the paper's models', built
offline: a SentencePiece model trained here (LLaMA-2's normalisation: a dummy prefix, byte
fallback) wrapped as a LLaMA tokenizer, and byte-level BPEs like Phi-2's and LLaMA-3's."""

from __future__ import annotations

import pytest

from lalora.core.errors import ModelError
from lalora.data.files import read_split, write_split
from lalora.data.generated import generate_task
from lalora.models.classifier import answer_token_ids

TEXT = (
    "the a of to and in is it that was for on are with as his they be at one have this from or "
    "had by word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long "
    "make thing see him two has look more day could go come did number sound no most people my "
    "over know water than call first who may down side been now find any new work part take get "
    "place made live where after back little only round man year came show every good give our "
    "under name very through just form sentence great think say help low line differ turn cause "
    "much mean before move right boy old too same tell does set three want air well also play "
    "small end put home read hand port large spell add even land here must big high such follow "
    "act why ask men change went light kind off need house picture try again animal point mother "
    "world near build self earth father head stand own page should country found answer school "
    "grow study still learn plant cover food sun four between state keep eye never last let "
    "thought city tree cross farm hard start might story saw far sea draw left late run while"
)
WORDS = TEXT.split()
ANSWERS = (" A", " B", " C", " D")


def _prompts() -> list[str]:
    """Prompts shaped like the study's: a question, the choices, 'Answer:'."""
    out = []
    for i in range(0, len(WORDS) - 12, 7):
        q = " ".join(WORDS[i : i + 9])
        out.append(f"Question: {q}? Choices: A. {WORDS[i]} B. {WORDS[i + 1]} C. {WORDS[i + 2]} "
                   f"D. {WORDS[i + 3]} Answer:")  # fmt: skip
    return out


@pytest.fixture(scope="module")
def sentencepiece_llama(tmp_path_factory):
    """A SentencePiece BPE trained on the prompts, with LLaMA-2's settings (dummy prefix, byte
    fallback, no whitespace collapsing), and the HF LlamaTokenizer that reads its pieces with
    LLaMA-2's normaliser (prepend '▁', spaces to '▁')."""
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import normalizers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    folder = tmp_path_factory.mktemp("spm")
    texts = _prompts() + [f"{p} {a.strip()}" for p in _prompts()[:20] for a in ANSWERS]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(folder / "sp"), vocab_size=420,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, character_coverage=1.0,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab))
    tok._tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tok._tokenizer.pre_tokenizer = None
    return sp, tok


def test_the_wrapped_tokenizer_is_the_sentencepiece_model(sentencepiece_llama):
    """The HF tokenizer gives SentencePiece's own ids, byte fallback included, and " A" alone
    is LLaMA-2's two pieces: a bare '▁' and '▁A'."""
    sp, tok = sentencepiece_llama
    for text in [*_prompts()[:10], " A", "Answer: B", "naïve café ☃"]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
    assert sp.id_to_piece(sp.encode(" A")) == ["▁", "▁A"]


def test_sentencepiece_answers_are_the_tokens_that_continue_the_prompt(sentencepiece_llama):
    sp, tok = sentencepiece_llama
    prompts = _prompts()
    ids = answer_token_ids(tok, ANSWERS, prompts)
    for prompt in prompts:
        for ans, i in zip(ANSWERS, ids, strict=True):
            head, full = sp.encode(prompt), sp.encode(prompt + ans)
            assert full[: len(head)] == head and full[len(head)] == i
    assert sp.id_to_piece(ids) == ["▁A", "▁B", "▁C", "▁D"]
    # encoding the answer alone gives the dummy-prefix piece first: the wrong logit
    assert [sp.encode(a)[0] for a in ANSWERS] == [sp.piece_to_id("▁")] * 4


def _byte_level(pre_tokenizer) -> object:
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizer
    raw.decoder = decoders.ByteLevel()
    from tokenizers import pre_tokenizers

    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    raw.train_from_iterator(_prompts() + [f"{p}{a}" for p in _prompts() for a in ANSWERS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")


@pytest.mark.parametrize("kind", ["phi2", "llama3"])
def test_byte_level_answers_are_the_tokens_that_continue_the_prompt(kind):
    """GPT-2's byte-level BPE (Phi-2) and LLaMA-3's (a regex split before the bytes)."""
    from tokenizers import Regex, pre_tokenizers

    if kind == "phi2":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        split = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                      r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(split, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    tok = _byte_level(pre)
    prompts = _prompts()
    ids = answer_token_ids(tok, ANSWERS, prompts)
    for prompt in prompts:
        for ans, i in zip(ANSWERS, ids, strict=True):
            head = tok.encode(prompt, add_special_tokens=False)
            full = tok.encode(prompt + ans, add_special_tokens=False)
            assert full[: len(head)] == head and full[len(head)] == i
    assert tok.convert_ids_to_tokens(ids) == ["ĠA", "ĠB", "ĠC", "ĠD"]


def test_a_prompt_that_the_answer_merges_into_is_refused():
    """An answer that merges with the prompt's last token ("the" + "y" is SmolLM2's single
    token "they"): the prompt's own tokens change, and the prompt is named."""
    from lalora.config import ModelCard
    from lalora.models.zoo import load_tokenizer

    tok = load_tokenizer(ModelCard(source="tiny", arch="llama"))
    assert len(answer_token_ids(tok, ("y", "m"), ["Question: is it? Answer:"])) == 2
    with pytest.raises(ModelError, match="does not follow the prompt 'Question: is it the'"):
        answer_token_ids(tok, ("y", "m"), ["Question: is it? Answer:", "Question: is it the"])


def test_the_study_s_prompts_give_the_same_ids_as_before(tmp_path):
    """SmolLM2's byte-level BPE on the generated task's prompts: the continuation is the
    answer's own single token, as encode(answer) gave (the study's numbers are unchanged)."""
    from lalora.config import ModelCard
    from lalora.data.datasets import winogrande_prompt
    from lalora.models.zoo import load_tokenizer

    tok = load_tokenizer(ModelCard(source="tiny", arch="llama"))
    train, _ = generate_task(40, 4, 0)
    examples = [winogrande_prompt(r, f"g{i}") for i, r in enumerate(train)]
    write_split(tmp_path / "train.jsonl", examples, (" A", " B"))
    split = read_split(tmp_path / "train.jsonl")
    ids = answer_token_ids(tok, split.answers, [e.prompt for e in split.examples])
    assert ids == [tok.encode(a, add_special_tokens=False)[0] for a in split.answers]
