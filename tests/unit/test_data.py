"""The data product on a tiny corpus made here: tokenizer training, preprocessing to megatron's indexed
dataset (text and jsonl), the command-line errors, dataset building (splits, blends, mock, the index cache
with and without torch.distributed) and the resumable microbatch iterator."""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_muon.cli import preprocess_data as preprocess_tool
from megatron_muon.cli import train_tokenizer as train_tokenizer_tool
from megatron_muon.data import (
    build_gpt_datasets,
    build_microbatch_iterator,
    gpt_batch,
    iter_documents,
    load_tokenizer,
    null_tokenizer,
    split_document_counts,
)

REPO = Path(__file__).resolve().parents[2]
VOCAB_SIZE = 400
SEQ_LENGTH = 32
WORDS = (
    "the of and to in that is was he for it with as his on be at by had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while"
).split()


def make_text(rng: random.Random, paragraphs: int) -> str:
    out = []
    for _ in range(paragraphs):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(rng.randint(2, 5))
        ]
        lines[0] = lines[0].capitalize()
        out.append("\n".join(lines) + ".\n")
    return "\n".join(out)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for index in range(2):
        (root / f"book{index}.txt").write_text(make_text(rng, 60), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("tok") / "tokenizer"
    code = train_tokenizer_tool.main(
        ["--input", str(corpus / "*.txt"), "--output", str(output), "--vocab-size", str(VOCAB_SIZE)]
    )
    assert code == 0
    return output


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def preprocess(inputs, tokenizer_dir, prefix, *extra) -> int:
    return preprocess_tool.main(
        [
            "--input",
            *map(str, inputs),
            "--tokenizer",
            str(tokenizer_dir),
            "--output-prefix",
            str(prefix),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def text_prefix(corpus, tokenizer_dir, tmp_path_factory) -> str:
    """The corpus cut into ~4-line documents (about 50), tokenized on two worker processes."""
    prefix = tmp_path_factory.mktemp("data") / "books"
    assert (
        preprocess([corpus / "*.txt"], tokenizer_dir, prefix, "--lines-per-document", "4", "--workers", "2")
        == 0
    )
    return f"{prefix}_text_document"


def read_sequences(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    # Copies: the arrays are views into a memory map that closes with the dataset.
    return [np.array(dataset[index]) for index in range(len(dataset))]


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_trains_loads_and_round_trips(tokenizer_dir, tokenizer, capsys):
    assert {p.name for p in tokenizer_dir.iterdir()} >= {"tokenizer.model", "tokenizer_metadata.json"}
    assert tokenizer.vocab_size == VOCAB_SIZE
    # Lossless: whitespace runs, newlines and characters never seen (byte fallback) come back as they were.
    text = "The  world\n   was made, 1234 times: café ☃"
    ids = tokenizer.tokenize(text)
    assert max(ids) < VOCAB_SIZE
    assert tokenizer.detokenize(ids) == text


def test_train_tokenizer_refuses_a_non_empty_output(corpus, tokenizer_dir, capsys):
    model = tokenizer_dir / "tokenizer.model"
    before = model.read_bytes()
    capsys.readouterr()
    code = train_tokenizer_tool.main(["--input", str(corpus / "*.txt"), "--output", str(tokenizer_dir)])
    assert code != 0
    [line] = error_lines(capsys.readouterr().err)
    assert str(tokenizer_dir) in line and "--force" in line
    assert model.read_bytes() == before


def test_train_tokenizer_reports_an_impossible_vocab_in_one_line(corpus, tmp_path, capsys):
    output = tmp_path / "tok"
    code = train_tokenizer_tool.main(
        ["--input", str(corpus / "book0.txt"), "--output", str(output), "--vocab-size", "100"]
    )
    assert code != 0
    [line] = error_lines(capsys.readouterr().err)
    assert "vocab_size=100" in line
    assert not output.exists()


# --- preprocessing -----------------------------------------------------------------------------------


def test_preprocess_text_holds_every_document_with_an_eod(corpus, tokenizer, text_prefix, capsys):
    documents = list(iter_documents(sorted(map(str, corpus.glob("*.txt"))), lines_per_document=4))
    assert len(documents) > 20  # cut into documents, not one per file
    expected = [np.array(tokenizer.tokenize(doc.text) + [tokenizer.eod]) for doc in documents]
    sequences = read_sequences(text_prefix)
    assert len(sequences) == len(expected)
    for got, want in zip(sequences, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    total = sum(len(sequence) for sequence in expected)
    assert total == sum(len(tokenizer.tokenize(doc.text)) for doc in documents) + len(documents)


def test_preprocess_reports_documents_and_tokens(corpus, tokenizer_dir, tokenizer, tmp_path, capsys):
    prefix = tmp_path / "one"
    assert preprocess([corpus / "book0.txt"], tokenizer_dir, prefix) == 0  # one document per file
    text = (corpus / "book0.txt").read_text().strip("\n")
    tokens = len(tokenizer.tokenize(text)) + 1
    assert f"1 documents, {tokens:,} tokens" in capsys.readouterr().out


def test_preprocess_jsonl(tokenizer_dir, tokenizer, tmp_path):
    records = [{"text": "First doc.\nTwo lines."}, {"text": "   "}, {"text": "Third, with a café.", "id": 3}]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert preprocess([source], tokenizer_dir, tmp_path / "j") == 0
    sequences = read_sequences(str(tmp_path / "j_text_document"))
    kept = [records[0]["text"], records[2]["text"]]  # the blank record is skipped
    assert [s.tolist() for s in sequences] == [tokenizer.tokenize(t) + [tokenizer.eod] for t in kept]


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("missing input", "nothere*.txt"),
        ("empty input", "blank.txt"),
        ("unknown tokenizer", "no_tokenizer"),
        ("bad json", "bad.jsonl:2"),
        ("not utf-8", "latin.txt"),
        ("outputs exist", "old_text_document.bin"),
    ],
)
def test_preprocess_bad_inputs_give_one_line_and_keep_outputs(case, named, tokenizer_dir, tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "good.txt").write_text("Some text.\n")
    (tmp_path / "latin.txt").write_bytes("Caf\u00e9 cr\u00e8me.\n".encode("latin-1"))
    prefix = tmp_path / "old"
    old = {suffix: f"old {suffix}".encode() for suffix in (".bin", ".idx")}
    for suffix, content in old.items():
        Path(f"{prefix}_text_document{suffix}").write_bytes(content)
    inputs = {
        "missing input": [tmp_path / "nothere*.txt"],
        "empty input": [tmp_path / "blank.txt"],
        "unknown tokenizer": [tmp_path / "good.txt"],
        "bad json": [tmp_path / "bad.jsonl"],
        "not utf-8": [tmp_path / "good.txt", tmp_path / "latin.txt"],
        "outputs exist": [tmp_path / "good.txt"],
    }[case]
    tokenizer = tmp_path / "no_tokenizer" if case == "unknown tokenizer" else tokenizer_dir
    force = [] if case == "outputs exist" else ["--force"]  # --force: a failing run still must not clobber
    capsys.readouterr()
    assert preprocess(inputs, tokenizer, prefix, *force) != 0
    [line] = error_lines(capsys.readouterr().err)
    assert named in line
    for suffix, content in old.items():
        assert Path(f"{prefix}_text_document{suffix}").read_bytes() == content
    assert not list(tmp_path.glob("*.partial"))


# --- datasets ----------------------------------------------------------------------------------------


def test_split_document_counts_match_megatron():
    assert split_document_counts(1000, "969,30,1") == (969, 30, 1)
    assert split_document_counts(42, "969,30,1") == (41, 1, 0)
    assert split_document_counts(10, "1,0,1") == (5, 0, 5)
    assert split_document_counts(7, "100") == (7, 0, 0)


@pytest.mark.timeout(60)  # megatron would loop forever on this; the check must fire first
def test_a_split_without_documents_raises_instead_of_hanging(tokenizer, text_prefix, tmp_path):
    with pytest.raises(ValueError, match=r"the test split gets 0 of the \d+ documents .*'969,30,1'"):
        build_gpt_datasets(
            tokenizer=tokenizer,
            seq_length=SEQ_LENGTH,
            train_samples=16,
            valid_samples=4,
            test_samples=4,
            data_paths=[text_prefix],
            split="969,30,1",
            cache_dir=str(tmp_path),
        )
    # Asking that split for nothing builds the others.
    train, valid, test = build_gpt_datasets(
        tokenizer=tokenizer,
        seq_length=SEQ_LENGTH,
        train_samples=16,
        valid_samples=4,
        test_samples=0,
        data_paths=[text_prefix],
        split="969,30,1",
        cache_dir=str(tmp_path),
    )
    assert len(train) >= 16 and len(valid) >= 4 and test is None


def test_missing_files_and_small_model_vocab_are_named(tokenizer, text_prefix, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing_text_document\.idx not found"):
        build_gpt_datasets(
            tokenizer=tokenizer,
            seq_length=SEQ_LENGTH,
            train_samples=8,
            data_paths=[str(tmp_path / "nothing_text_document")],
        )
    with pytest.raises(
        ValueError, match=f"vocab_size={VOCAB_SIZE} exceeds the model's padded vocab size 256"
    ):
        build_gpt_datasets(
            tokenizer=tokenizer,
            seq_length=SEQ_LENGTH,
            train_samples=8,
            data_paths=[text_prefix],
            model_vocab_size=256,
        )


def test_samples_follow_the_tokens_and_the_cache_is_reused(tokenizer, text_prefix, tmp_path):
    kwargs = dict(
        tokenizer=tokenizer, seq_length=SEQ_LENGTH, train_samples=40, data_paths=[text_prefix], split="9,1,0"
    )
    train, _, _ = build_gpt_datasets(**kwargs, cache_dir=str(tmp_path / "cache"))
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(name.endswith("GPTDataset-train-shuffle_index.npy") for name in cached)
    again, _, _ = build_gpt_datasets(**kwargs, cache_dir=str(tmp_path / "cache"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
    sample = train[3]
    torch.testing.assert_close(again[3]["tokens"], sample["tokens"])
    assert sample["tokens"].shape == (SEQ_LENGTH,)
    torch.testing.assert_close(sample["tokens"][1:], sample["labels"][:-1])
    # Default cache: beside the data.
    build_gpt_datasets(**kwargs)
    assert any((Path(text_prefix).parent / "cache").iterdir())


def test_blend_of_two_prefixes_builds(corpus, tokenizer_dir, tokenizer, text_prefix, tmp_path):
    second = tmp_path / "para"
    assert preprocess([corpus / "book1.txt"], tokenizer_dir, second, "--lines-per-document", "1") == 0
    train, valid, _ = build_gpt_datasets(
        tokenizer=tokenizer,
        seq_length=SEQ_LENGTH,
        train_samples=50,
        valid_samples=5,
        data_paths=[text_prefix, f"{second}_text_document"],
        data_weights=[0.7, 0.3],
        split="9,1,0",
        cache_dir=str(tmp_path / "cache"),
    )
    assert type(train).__name__ == "BlendedDataset" and len(train) >= 50 and len(valid) >= 5
    drawn = np.bincount(np.asarray(train.dataset_index[:50]), minlength=2)
    assert drawn[0] > drawn[1] > 0
    assert gpt_batch([train[i] for i in range(3)])["tokens"].shape == (3, SEQ_LENGTH)


def test_mock_data_builds():
    train, valid, test = build_gpt_datasets(
        tokenizer=null_tokenizer(128), seq_length=SEQ_LENGTH, train_samples=8, valid_samples=2, mock=True
    )
    assert type(train).__name__ == "MockGPTDataset" and test is None
    batch = next(build_microbatch_iterator(train, micro_batch_size=4))
    assert batch["tokens"].shape == (4, SEQ_LENGTH) and int(batch["tokens"].max()) < 128


@pytest.fixture
def gloo_world_of_one(tmp_path):
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'rendezvous'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(60)
def test_builds_with_torch_distributed_initialized(gloo_world_of_one, tokenizer, text_prefix, tmp_path):
    train, _, _ = build_gpt_datasets(
        tokenizer=tokenizer,
        seq_length=SEQ_LENGTH,
        train_samples=8,
        data_paths=[text_prefix],
        split="1,0,0",
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(train) >= 8 and any((tmp_path / "cache").iterdir())
    with pytest.raises(ValueError, match="global rank 0"):
        build_gpt_datasets(
            tokenizer=tokenizer,
            seq_length=SEQ_LENGTH,
            train_samples=8,
            data_paths=[text_prefix],
            split="1,0,0",
            is_built_on_rank=lambda: False,
        )


# --- microbatches ------------------------------------------------------------------------------------


def test_gpt_batch_shapes_and_dtypes(tokenizer, text_prefix, tmp_path):
    train, _, _ = build_gpt_datasets(
        tokenizer=tokenizer,
        seq_length=SEQ_LENGTH,
        train_samples=4,
        data_paths=[text_prefix],
        split="1,0,0",
        cache_dir=str(tmp_path),
    )
    single = gpt_batch(train[0])
    assert set(single) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert all(value.shape == (1, SEQ_LENGTH) for value in single.values())
    assert single["loss_mask"].dtype == torch.float32 and single["position_ids"].dtype == torch.int64
    assert single["tokens"].dtype == torch.int64 and single["labels"].dtype == torch.int64
    torch.testing.assert_close(single["position_ids"][0], torch.arange(SEQ_LENGTH))


def test_iterator_splits_ranks_and_resumes_from_consumed_samples(tokenizer, text_prefix, tmp_path):
    train, _, _ = build_gpt_datasets(
        tokenizer=tokenizer,
        seq_length=SEQ_LENGTH,
        train_samples=40,
        data_paths=[text_prefix],
        split="1,0,0",
        cache_dir=str(tmp_path),
    )
    micro, dp = 2, 2
    per_rank = [
        list(
            build_microbatch_iterator(
                train, micro_batch_size=micro, data_parallel_rank=r, data_parallel_size=dp
            )
        )
        for r in range(dp)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == len(train) // (micro * dp)
    for rank, batches in enumerate(per_rank):
        for step, batch in enumerate(batches[:3]):
            assert batch["tokens"].shape == (micro, SEQ_LENGTH)
            first = step * micro * dp + rank * micro
            want = torch.stack([train[first + j]["tokens"] for j in range(micro)])
            torch.testing.assert_close(batch["tokens"], want)
    # Resume after 3 steps (global count): each rank continues with its 4th microbatch.
    consumed = 3 * micro * dp
    for rank in range(dp):
        resumed = build_microbatch_iterator(
            train,
            micro_batch_size=micro,
            consumed_samples=consumed,
            data_parallel_rank=rank,
            data_parallel_size=dp,
        )
        for want in per_rank[rank][3:5]:
            got = next(resumed)
            for key in want:
                torch.testing.assert_close(got[key], want[key])
    with pytest.raises(ValueError, match="consumed_samples"):
        build_microbatch_iterator(train, micro_batch_size=micro, consumed_samples=len(train))
